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


# Windows (contract §6): `from` must be before `to` (else 400 `invalid_range`), and a
# concurrency window holds at most 10,000 steps (else 400 `too_many_points`). OpenAPI cannot
# state a relation between two parameters, so positive cases are put in order here; the
# relations themselves are tested in tests/analytics.rs.
from datetime import datetime, timedelta, timezone


def _time(v):
    try:
        t = datetime.fromisoformat(str(v).replace("Z", "+00:00"))
        return t if t.tzinfo else t.replace(tzinfo=timezone.utc)
    except (ValueError, TypeError):
        return None


@schemathesis.hook
def map_query(ctx, query):
    if not isinstance(query, dict):
        return query
    f, t = _time(query.get("from")), _time(query.get("to"))
    now = datetime.now(timezone.utc)
    if f is not None and t is not None and f >= t:
        query["from"], query["to"] = query["to"], query["from"]
        f, t = t, f
        if f == t:
            del query["from"]
            f = None
    if f is not None and t is None and f >= now:
        del query["from"]
        f = None
    step = query.get("step")
    if isinstance(step, int) and step >= 1:
        start = f or ((t or now) - timedelta(hours=24))
        end = t or now
        secs = max((end - start).total_seconds(), 0)
        need = int(secs // 10000) + 1
        if step < need:
            query["step"] = min(need, 31622400)
    return query
