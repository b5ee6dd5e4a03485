//! The on-disk spool: where batches wait while Postgres is unreachable, slow, or the queue is
//! past its bound.
//!
//! Format: segment files `spool-<20-digit number>.seg` in `store.spool_dir`, replayed in
//! name order. A segment is a sequence of records:
//!
//! ```text
//! u32 LE  payload length
//! u32 LE  CRC-32 (IEEE) of the event count and the payload
//! u32 LE  event count (lets the spool be counted without decoding it)
//! bytes   payload: one batch, JSON array of StoredEvent
//! ```
//!
//! Every append is followed by `fdatasync`: a batch counts as accepted once it is here or in
//! Postgres. A torn record (crash mid-append: short length, short payload or bad checksum) is
//! skipped with a warning; reading never panics. Segments roll over at a size limit and are
//! deleted once every batch in them is in Postgres.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use super::StoredEvent;

/// Upper bound of one record's payload; a longer length field means corruption.
const MAX_RECORD: u32 = 256 << 20;
/// Record header: length, checksum, event count.
const HEADER: usize = 12;

/// The spool directory and the segment currently appended to.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    segment_bytes: u64,
    current: Option<(PathBuf, File, u64)>,
    next_number: u64,
}

/// Result of reading one segment.
#[derive(Debug, Default)]
pub struct SegmentRead {
    /// The intact batches, in order.
    pub batches: Vec<Vec<StoredEvent>>,
    /// Records skipped as torn or corrupt.
    pub skipped: usize,
}

impl Spool {
    /// Opens (creating) the directory and finds existing segments.
    pub fn open(dir: &Path, segment_bytes: u64) -> io::Result<Spool> {
        fs::create_dir_all(dir)?;
        let mut s = Spool {
            dir: dir.to_owned(),
            segment_bytes: segment_bytes.max(4096),
            current: None,
            next_number: 0,
        };
        s.next_number = s
            .segments()?
            .last()
            .and_then(|p| segment_number(p))
            .map_or(0, |n| n + 1);
        Ok(s)
    }

    /// Segment files, oldest first.
    pub fn segments(&self) -> io::Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> = fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| segment_number(p).is_some())
            .collect();
        v.sort();
        Ok(v)
    }

    /// True when batches are waiting on disk.
    pub fn has_pending(&self) -> bool {
        self.segments().map(|s| !s.is_empty()).unwrap_or(false)
    }

    /// Appends one batch durably (write + fdatasync).
    pub fn append(&mut self, batch: &[StoredEvent]) -> io::Result<()> {
        let payload = serde_json::to_vec(batch).map_err(io::Error::other)?;
        let count = (batch.len() as u32).to_le_bytes();
        let mut h = crc32fast::Hasher::new();
        h.update(&count);
        h.update(&payload);
        let mut record = Vec::with_capacity(payload.len() + HEADER);
        record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        record.extend_from_slice(&h.finalize().to_le_bytes());
        record.extend_from_slice(&count);
        record.extend_from_slice(&payload);
        let rotate = match &self.current {
            Some((_, _, size)) => *size + record.len() as u64 > self.segment_bytes,
            None => true,
        };
        if rotate {
            self.seal();
            let path = self.dir.join(format!("spool-{:020}.seg", self.next_number));
            self.next_number += 1;
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            // Make the new file's directory entry durable too.
            if let Ok(d) = File::open(&self.dir) {
                let _ = d.sync_all();
            }
            self.current = Some((path, file, 0));
        }
        let Some((_, file, size)) = &mut self.current else {
            return Err(io::Error::other("no spool segment"));
        };
        file.write_all(&record)?;
        file.sync_data()?;
        *size += record.len() as u64;
        Ok(())
    }

    /// Stops appending to the current segment (so that it can be replayed and deleted).
    pub fn seal(&mut self) {
        self.current = None;
    }

    /// Reads one segment, skipping torn or corrupt records.
    pub fn read_segment(path: &Path) -> io::Result<SegmentRead> {
        let mut data = Vec::new();
        File::open(path)?.read_to_end(&mut data)?;
        Ok(decode(&data, path))
    }

    /// Events in a segment, from the record headers (no decoding; torn tails ignored).
    pub fn count_events(path: &Path) -> io::Result<u64> {
        let data = fs::read(path)?;
        let mut pos = 0usize;
        let mut n = 0u64;
        while let Some(h) = data.get(pos..pos + HEADER) {
            let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
            if len as u32 > MAX_RECORD || data.len() < pos + HEADER + len {
                break;
            }
            n += u64::from(u32::from_le_bytes([h[8], h[9], h[10], h[11]]));
            pos += HEADER + len;
        }
        Ok(n)
    }

    /// Deletes a fully replayed segment.
    pub fn remove(&mut self, path: &Path) -> io::Result<()> {
        if self.current.as_ref().is_some_and(|(p, _, _)| p == path) {
            self.current = None;
        }
        fs::remove_file(path)
    }
}

fn segment_number(p: &Path) -> Option<u64> {
    let name = p.file_name()?.to_str()?;
    name.strip_prefix("spool-")?
        .strip_suffix(".seg")?
        .parse()
        .ok()
}

/// Decodes the records of one segment's bytes (`path` only names it in warnings): the good
/// batches in order, and how many records were torn, corrupt or undecodable. Never panics,
/// whatever the bytes (fuzzed: `fuzz/fuzz_targets/spool.rs`).
pub fn decode(data: &[u8], path: &Path) -> SegmentRead {
    let mut out = SegmentRead::default();
    let mut pos = 0usize;
    while pos < data.len() {
        let Some(header) = data.get(pos..pos + HEADER) else {
            tracing::warn!(file = %path.display(), offset = pos, "spool: torn record header at end of segment, skipped");
            out.skipped += 1;
            break;
        };
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len > MAX_RECORD {
            tracing::warn!(file = %path.display(), offset = pos, len, "spool: implausible record length, rest of segment skipped");
            out.skipped += 1;
            break;
        }
        let start = pos + HEADER;
        let Some(payload) = data.get(start..start + len as usize) else {
            tracing::warn!(file = %path.display(), offset = pos, "spool: torn record at end of segment (crash mid-write?), skipped");
            out.skipped += 1;
            break;
        };
        let mut h = crc32fast::Hasher::new();
        h.update(&header[8..12]);
        h.update(payload);
        let at = pos;
        pos = start + len as usize;
        if h.finalize() != crc {
            tracing::warn!(file = %path.display(), offset = at, "spool: record checksum mismatch, skipped");
            out.skipped += 1;
            continue;
        }
        match serde_json::from_slice::<Vec<StoredEvent>>(payload) {
            Ok(batch) => out.batches.push(batch),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "spool: undecodable record, skipped");
                out.skipped += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::sample_events;

    #[test]
    fn roundtrip_rotation_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 4096).unwrap();
        assert!(!s.has_pending());
        let a = sample_events(3, 0);
        let b = sample_events(40, 100);
        s.append(&a).unwrap();
        s.append(&b).unwrap();
        s.append(&a).unwrap();
        let segs = s.segments().unwrap_or_default();
        assert!(segs.len() >= 2, "rotated at 4 KiB: {segs:?}");
        let all: Vec<_> = segs
            .iter()
            .flat_map(|p| {
                Spool::read_segment(p)
                    .map(|r| r.batches)
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(all, vec![a.clone(), b.clone(), a.clone()]);

        // Tear the last record of the last segment.
        let last = segs.last().cloned().unwrap_or_default();
        let len = fs::metadata(&last).map(|m| m.len()).unwrap_or(0);
        OpenOptions::new()
            .write(true)
            .open(&last)
            .and_then(|f| f.set_len(len - 5))
            .unwrap();
        let r = Spool::read_segment(&last).unwrap();
        assert_eq!(r.skipped, 1);
        let counted: u64 = segs
            .iter()
            .map(|p| Spool::count_events(p).unwrap_or(0))
            .sum();
        assert_eq!(
            counted,
            3 + 40 + 3 - 3,
            "headers count the intact records (the torn one not)"
        );

        // Corrupt a byte in the middle of the first segment's first payload.
        let first = segs[0].clone();
        let mut data = fs::read(&first).unwrap_or_default();
        data[20] ^= 0xff;
        fs::write(&first, &data).unwrap();
        let r = Spool::read_segment(&first).unwrap();
        assert_eq!(r.skipped, 1);

        // A reopened spool continues numbering after the existing segments.
        let s2 = Spool::open(dir.path(), 4096).unwrap();
        assert!(s2.next_number as usize >= segs.len());
    }

    #[test]
    fn the_fuzz_corpus_seeds_decode_as_the_format_says() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/spool");
        let two = decode(&fs::read(dir.join("two-records.seg")).unwrap(), &dir);
        assert_eq!((two.batches.len(), two.skipped), (2, 0));
        assert!(two.batches[1][0].closed);
        let torn = decode(&fs::read(dir.join("torn.seg")).unwrap(), &dir);
        assert_eq!((torn.batches.len(), torn.skipped), (2, 1));
    }

    #[test]
    fn garbage_never_panics() {
        for data in [
            vec![],
            vec![1, 2, 3],
            vec![255; 8],
            vec![0; 64],
            b"\x05\0\0\0\0\0\0\0\x01\0\0\0hello".to_vec(),
        ] {
            let _ = decode(&data, Path::new("x"));
        }
    }
}
