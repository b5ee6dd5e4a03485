//! The spool record decoder: any segment bytes → the good batches and a count of skipped
//! records, never a panic (a torn or corrupt spool must not stop the bridge).
//!   RUSTC_BOOTSTRAP=1 cargo fuzz run spool
#![no_main]

use libfuzzer_sys::fuzz_target;
use presence_bridge::store::spool::decode;

fuzz_target!(|data: &[u8]| {
    let _ = decode(data, std::path::Path::new("fuzz.seg"));
});
