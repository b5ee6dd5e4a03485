"""schemathesis hooks for presence-bridge's OpenAPI document.

The document gives bare JIDs the string format `jid` (RFC 7622: a PRECIS localpart and an IDNA
domain), which no regular expression states exactly. Positive cases need values the bridge must
accept, so they are drawn from a plain, always-valid subset; anything outside the format is
answered 400 `invalid_jid`, which the negative cases check.
"""

import schemathesis
from hypothesis import strategies as st

JID = st.from_regex(r"\A[a-z0-9][a-z0-9._-]{0,19}@[a-z0-9]{1,12}(\.[a-z0-9]{1,12}){0,3}\Z")

schemathesis.openapi.format("jid", JID)
