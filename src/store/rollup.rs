//! Rollups of complete days (schema V5), so that `online-time` and `concurrency` over long
//! windows read one small row per user-day, client-day and minute instead of every session.
//!
//! - **Exact by construction**: a day's rollup is computed from that day's sessions by the
//!   same functions (`presence::analytics`) that answer a window from sessions, and is written
//!   in one transaction. A query takes the built days inside its window from the rollups and
//!   everything else (the partial first and last days, today, days not built yet) from the
//!   sessions, in one snapshot.
//! - **Invalidation**: a day is built only once it ended [`SETTLE`] ago. The writer, in the
//!   same transaction as the sessions of a batch whose earliest event is older than [`LATE`]
//!   (a late batch, or a spool replay after an outage), deletes the built marks of that day and
//!   every later one, under the advisory lock [`LOCK_KEY`] that the builder holds while it
//!   reads a day. So a built day never misses a session, replays only invalidate again
//!   (idempotent), and a crash at any point leaves either the old rollup or none.
//! - **Repair**: [`rebuild`] (`presence-bridge rollup --rebuild`) deletes every built mark;
//!   the builder (in `run`, every [`EVERY`], and at start) builds what is missing.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};
use deadpool_postgres::GenericClient;
use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use super::memory::HistoryFilter;
use super::reads::{STATEMENT_TIMEOUT, filter_params, spans_on};
use super::{StoreError, pg};
use crate::presence::analytics::{self, Concurrency, Group, Point, Span, TimeRow};

/// The advisory lock shared by the builder (while it reads a day) and a late writer batch.
pub const LOCK_KEY: i64 = 0x7062_726f_6c6c_7570;
/// A day is built once it ended this long ago.
pub const SETTLE: Duration = Duration::hours(2);
/// A writer batch whose earliest event is older than this invalidates rollups.
pub const LATE: Duration = Duration::hours(1);
/// How often the builder looks for days to build.
pub const EVERY: std::time::Duration = std::time::Duration::from_secs(600);
/// Most sessions one day's build may read.
const MAX_DAY_SESSIONS: usize = 5_000_000;

fn day_start(d: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&d.and_time(chrono::NaiveTime::MIN))
}

/// Called by the writer inside the transaction that writes a batch's sessions: when the
/// batch reaches back before [`LATE`], waits for a running build and unmarks every built day
/// from the batch's earliest day on.
pub async fn invalidate(
    tx: &tokio_postgres::Transaction<'_>,
    earliest: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<(), tokio_postgres::Error> {
    if earliest >= now - LATE {
        return Ok(());
    }
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await?;
    tx.execute(
        "DELETE FROM presence_rollup_days WHERE day >= $1",
        &[&earliest.date_naive()],
    )
    .await?;
    Ok(())
}

/// The days a builder should have built at `now`: from the oldest retained day to the last
/// day that ended [`SETTLE`] ago.
pub fn due_days(now: DateTime<Utc>, retention_days: u32) -> Vec<NaiveDate> {
    let last = (now - SETTLE).date_naive() - Duration::days(1);
    let first = now.date_naive() - Duration::days(i64::from(retention_days));
    first.iter_days().take_while(|d| *d <= last).collect()
}

/// Builds every due day that is not built; the days built.
pub async fn build_due(
    pool: &Pool,
    retention_days: u32,
    now: DateTime<Utc>,
) -> Result<Vec<NaiveDate>, StoreError> {
    let due = due_days(now, retention_days);
    let Some(first) = due.first().copied() else {
        return Ok(Vec::new());
    };
    let c = pg::client(pool).await?;
    // Rollups past retention go with the history they summarise.
    c.execute("DELETE FROM presence_rollup_days WHERE day < $1", &[&first])
        .await?;
    for t in ["presence_rollup_user_day", "presence_rollup_client_day"] {
        c.execute(&format!("DELETE FROM {t} WHERE day < $1"), &[&first])
            .await?;
    }
    c.execute(
        "DELETE FROM presence_rollup_minute WHERE minute < $1",
        &[&day_start(first)],
    )
    .await?;
    let built: BTreeSet<NaiveDate> = c
        .query(
            "SELECT day FROM presence_rollup_days WHERE day >= $1",
            &[&first],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    drop(c);
    let mut done = Vec::new();
    for d in due.into_iter().filter(|d| !built.contains(d)) {
        build_day(pool, d, now).await?;
        done.push(d);
    }
    Ok(done)
}

/// Computes and writes one day's rollup (replacing any earlier one); the sessions read.
pub async fn build_day(
    pool: &Pool,
    day: NaiveDate,
    now: DateTime<Utc>,
) -> Result<usize, StoreError> {
    let (d0, d1) = (day_start(day), day_start(day + Duration::days(1)));
    let mut c = pg::client(pool).await?;
    let tx = c.transaction().await?;
    tx.batch_execute("SET LOCAL statement_timeout = '300s'")
        .await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await?;
    let spans: Vec<Span> = spans_on(&tx, d0, d1, &HistoryFilter::default(), MAX_DAY_SESSIONS)
        .await?
        .ok_or_else(|| StoreError::Rollup(format!("{day}: more than {MAX_DAY_SESSIONS} sessions")))?
        .into_iter()
        .map(|r| r.span)
        .collect();
    let r = compute_day(&spans, d0, d1, now);
    for t in ["presence_rollup_user_day", "presence_rollup_client_day"] {
        tx.execute(&format!("DELETE FROM {t} WHERE day = $1"), &[&day])
            .await?;
    }
    tx.execute(
        "DELETE FROM presence_rollup_minute WHERE minute >= $1 AND minute < $2",
        &[&d0, &d1],
    )
    .await?;
    let (keys, millis, started) = columns(&r.users);
    tx.execute(
        "INSERT INTO presence_rollup_user_day (day, jid, millis, started) \
         SELECT $1, * FROM unnest($2::text[], $3::int8[], $4::int4[])",
        &[&day, &keys, &millis, &started],
    )
    .await?;
    let (keys, millis, started) = columns(&r.clients);
    tx.execute(
        "INSERT INTO presence_rollup_client_day (day, client, millis, started) \
         SELECT $1, * FROM unnest($2::text[], $3::int8[], $4::int4[])",
        &[&day, &keys, &millis, &started],
    )
    .await?;
    let scopes: Vec<&str> = r.minutes.iter().map(|m| m.0.as_str()).collect();
    let ts: Vec<DateTime<Utc>> = r.minutes.iter().map(|m| m.1.t).collect();
    let users: Vec<i32> = r.minutes.iter().map(|m| clamp(m.1.users)).collect();
    let res: Vec<i32> = r.minutes.iter().map(|m| clamp(m.1.resources)).collect();
    let at: Vec<DateTime<Utc>> = r.minutes.iter().map(|m| m.1.users_at).collect();
    tx.execute(
        "INSERT INTO presence_rollup_minute (scope, minute, users, resources, users_at) \
         SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::int4[], $4::int4[], $5::timestamptz[])",
        &[&scopes, &ts, &users, &res, &at],
    )
    .await?;
    tx.execute(
        "INSERT INTO presence_rollup_days (day, built_at, sessions) VALUES ($1, now(), $2) \
         ON CONFLICT (day) DO UPDATE SET built_at = excluded.built_at, sessions = excluded.sessions",
        &[&day, &clamp(spans.len() as u64)],
    )
    .await?;
    tx.commit().await?;
    Ok(spans.len())
}

fn clamp(n: u64) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn columns(rows: &[(String, i64, u64)]) -> (Vec<&str>, Vec<i64>, Vec<i32>) {
    (
        rows.iter().map(|r| r.0.as_str()).collect(),
        rows.iter().map(|r| r.1).collect(),
        rows.iter().map(|r| clamp(r.2)).collect(),
    )
}

/// One day's rollup rows.
#[derive(Debug, Default)]
pub struct DayRollup {
    /// (jid, ms online in the day, sessions started in the day).
    pub users: Vec<(String, i64, u64)>,
    /// (client, ms of its sessions in the day, sessions started in the day).
    pub clients: Vec<(String, i64, u64)>,
    /// (scope: '' for all or a domain, the minute's point); minutes with nobody online left out.
    pub minutes: Vec<(String, Point)>,
}

/// The key of a span for a group.
fn key(s: &Span, g: Group) -> &str {
    match g {
        Group::User => s.jid.as_str(),
        Group::Domain => s.jid.domain(),
        Group::Client => analytics::client_key(&s.client),
    }
}

/// Sessions that started inside `[from, to)` and are not empty, per key.
fn started_in(
    spans: &[Span],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    g: Group,
) -> HashMap<&str, u64> {
    let mut m: HashMap<&str, u64> = HashMap::new();
    for s in spans {
        if s.start >= from && s.start < to && s.end.is_none_or(|e| e > s.start) {
            *m.entry(key(s, g)).or_default() += 1;
        }
    }
    m
}

/// A day's rollup from the sessions overlapping it (pure: the builder's arithmetic).
pub fn compute_day(
    spans: &[Span],
    d0: DateTime<Utc>,
    d1: DateTime<Utc>,
    now: DateTime<Utc>,
) -> DayRollup {
    let per = |g: Group| {
        let started = started_in(spans, d0, d1, g);
        analytics::online_time(spans, d0, d1, now, g, usize::MAX)
            .into_iter()
            .map(|r| {
                let n = started.get(r.key.as_str()).copied().unwrap_or(0);
                (r.key, r.millis, n)
            })
            .collect::<Vec<_>>()
    };
    let mut minutes = Vec::new();
    let mut push = |scope: &str, c: Concurrency| {
        minutes.extend(
            c.points
                .into_iter()
                .filter(|p| p.resources > 0)
                .map(|p| (scope.to_owned(), p)),
        );
    };
    push(
        "",
        analytics::concurrency(spans, d0, d1, Duration::seconds(60), now),
    );
    let mut by_domain: HashMap<&str, Vec<Span>> = HashMap::new();
    for s in spans {
        by_domain.entry(s.jid.domain()).or_default().push(s.clone());
    }
    for (d, ss) in by_domain {
        push(
            d,
            analytics::concurrency(&ss, d0, d1, Duration::seconds(60), now),
        );
    }
    DayRollup {
        users: per(Group::User),
        clients: per(Group::Client),
        minutes,
    }
}

/// How a window splits: built days taken whole from the rollups, the rest from sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// Built days wholly inside the window.
    pub days: Vec<NaiveDate>,
    /// The rest of the window, as disjoint `[from, to)` parts in time order.
    pub raw: Vec<(DateTime<Utc>, DateTime<Utc>)>,
}

/// Splits `[from, to)` by the built days.
pub fn split(from: DateTime<Utc>, to: DateTime<Utc>, built: &BTreeSet<NaiveDate>) -> Split {
    let mut days = Vec::new();
    let mut raw: Vec<(DateTime<Utc>, DateTime<Utc>)> = Vec::new();
    let push_raw = |a: DateTime<Utc>, b: DateTime<Utc>, raw: &mut Vec<_>| {
        if a >= b {
            return;
        }
        match raw.last_mut() {
            Some((_, e)) if *e == a => *e = b,
            _ => raw.push((a, b)),
        }
    };
    let mut t = from;
    while t < to {
        let d = t.date_naive();
        let (d0, d1) = (day_start(d), day_start(d + Duration::days(1)));
        if d0 == t && d1 <= to && built.contains(&d) {
            days.push(d);
        } else {
            push_raw(t, d1.min(to), &mut raw);
        }
        t = d1.min(to);
    }
    Split { days, raw }
}

async fn built_days(
    tx: &impl GenericClient,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<BTreeSet<NaiveDate>, StoreError> {
    Ok(tx
        .query(
            "SELECT day FROM presence_rollup_days WHERE day >= $1 AND day <= $2",
            &[&from.date_naive(), &to.date_naive()],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// A read-only snapshot for a window query.
async fn snapshot(
    c: &mut deadpool_postgres::Object,
) -> Result<deadpool_postgres::Transaction<'_>, StoreError> {
    let tx = c
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    tx.batch_execute(STATEMENT_TIMEOUT).await?;
    Ok(tx)
}

/// `online-time` over Postgres with the rollups: `Ok(None)` when the window holds more than
/// `max` sessions outside built days (the caller answers `window_too_large`).
#[allow(clippy::too_many_arguments)]
pub async fn online_time(
    pool: &Pool,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    now: DateTime<Utc>,
    group: Group,
    filter: &HistoryFilter,
    limit: usize,
    max: usize,
) -> Result<Option<Vec<TimeRow>>, StoreError> {
    let (domains, _) = filter_params(filter);
    let mut c = pg::client(pool).await?;
    let tx = snapshot(&mut c).await?;
    // The client rollup has no domain: a domain-filtered client grouping reads sessions.
    let built = if group == Group::Client && domains.is_some() {
        BTreeSet::new()
    } else {
        built_days(&tx, from, to).await?
    };
    let parts = split(from, to, &built);
    let mut totals: HashMap<String, (i64, u64)> = HashMap::new();
    if !parts.days.is_empty() {
        let sql = match group {
            Group::User => {
                "SELECT jid, sum(millis)::int8, sum(started)::int8 FROM presence_rollup_user_day \
                 WHERE day = ANY($1) AND ($2::text[] IS NULL OR split_part(jid, '@', 2) = ANY($2)) GROUP BY jid"
            }
            Group::Domain => {
                "SELECT split_part(jid, '@', 2), sum(millis)::int8, sum(started)::int8 FROM presence_rollup_user_day \
                 WHERE day = ANY($1) AND ($2::text[] IS NULL OR split_part(jid, '@', 2) = ANY($2)) GROUP BY 1"
            }
            Group::Client => {
                "SELECT client, sum(millis)::int8, sum(started)::int8 FROM presence_rollup_client_day \
                 WHERE day = ANY($1) AND $2::text[] IS NULL GROUP BY client"
            }
        };
        for r in tx.query(sql, &[&parts.days, &domains]).await? {
            let e = totals.entry(r.get(0)).or_default();
            e.0 += r.get::<_, i64>(1);
            e.1 += r.get::<_, i64>(2).max(0) as u64;
        }
    }
    let mut budget = max;
    for (i, &(a, b)) in parts.raw.iter().enumerate() {
        let Some(rows) = spans_on(&tx, a, b, filter, budget).await? else {
            return Ok(None);
        };
        budget -= rows.len();
        let spans: Vec<Span> = rows.into_iter().map(|r| r.span).collect();
        for r in analytics::online_time(&spans, a, b, now, group, usize::MAX) {
            totals.entry(r.key).or_default().0 += r.millis;
        }
        for (k, n) in started_in(&spans, a, b, group) {
            totals.entry(k.to_owned()).or_default().1 += n;
        }
        // Sessions already running at `from` overlap the window too.
        if i == 0 && a == from {
            count_running(&spans, from, now, group, &mut totals);
        }
    }
    if parts.raw.first().is_none_or(|p| p.0 != from) {
        let running: Vec<Span> =
            spans_on(&tx, from, from + Duration::microseconds(1), filter, budget)
                .await?
                .ok_or(StoreError::Rollup(
                    "too many sessions at the window's start".into(),
                ))?
                .into_iter()
                .map(|r| r.span)
                .collect();
        count_running(&running, from, now, group, &mut totals);
    }
    tx.commit().await?;
    let mut rows: Vec<TimeRow> = totals
        .into_iter()
        .map(|(key, (millis, sessions))| TimeRow {
            key,
            millis,
            sessions,
        })
        .collect();
    rows.sort_by(|a, b| b.millis.cmp(&a.millis).then_with(|| a.key.cmp(&b.key)));
    rows.truncate(limit);
    Ok(Some(rows))
}

/// Counts the sessions that started before `from` and are still online at `from`.
fn count_running(
    spans: &[Span],
    from: DateTime<Utc>,
    now: DateTime<Utc>,
    group: Group,
    totals: &mut HashMap<String, (i64, u64)>,
) {
    for s in spans {
        if s.start < from && s.end.unwrap_or(now) > from {
            totals.entry(key(s, group).to_owned()).or_default().1 += 1;
        }
    }
}

/// `concurrency` over Postgres with the minute rollups. `Ok(None)` when the rollups cannot
/// answer this question (a step that is not whole minutes, a start inside a minute, several
/// domains, one user): the caller computes it from sessions. `Ok(Some(None))` when the
/// sessions outside built days are more than `max`.
pub async fn concurrency(
    pool: &Pool,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    step: Duration,
    now: DateTime<Utc>,
    filter: &HistoryFilter,
    max: usize,
) -> Result<Option<Option<Concurrency>>, StoreError> {
    let secs = step.num_seconds();
    let aligned = from.timestamp_subsec_nanos() == 0 && from.timestamp() % 60 == 0;
    let (domains, jid) = filter_params(filter);
    let scope = match &domains {
        None => String::new(),
        Some(d) if d.len() == 1 => d[0].clone(),
        Some(_) => return Ok(None),
    };
    if secs <= 0 || secs % 60 != 0 || step != Duration::seconds(secs) || !aligned || jid.is_some() {
        return Ok(None);
    }
    let mut c = pg::client(pool).await?;
    let tx = snapshot(&mut c).await?;
    let built = built_days(&tx, from, to).await?;
    // Each step: rolled (every minute of it in a built day) or from sessions.
    let mut steps: Vec<(DateTime<Utc>, DateTime<Utc>, bool)> = Vec::new();
    let mut t = from;
    while t < to {
        let e = (t + step).min(to);
        let whole = e.timestamp_subsec_nanos() == 0 && e.timestamp() % 60 == 0;
        let last = e - Duration::microseconds(1);
        let rolled = whole
            && t.date_naive()
                .iter_days()
                .take_while(|d| *d <= last.date_naive())
                .all(|d| built.contains(&d));
        steps.push((t, e, rolled));
        t = e;
    }
    let mut points: Vec<Option<Point>> = vec![None; steps.len()];
    // Rolled steps: one read of the minutes of the window.
    if let (Some(a), Some(b)) = (
        steps.iter().find(|s| s.2).map(|s| s.0),
        steps.iter().rev().find(|s| s.2).map(|s| s.1),
    ) {
        let rows = tx
            .query(
                "SELECT minute, users, resources, users_at FROM presence_rollup_minute \
                 WHERE scope = $1 AND minute >= $2 AND minute < $3 ORDER BY minute",
                &[&scope, &a, &b],
            )
            .await?;
        for (i, s) in steps.iter().enumerate() {
            if s.2 {
                points[i] = Some(Point {
                    t: s.0,
                    users: 0,
                    resources: 0,
                    users_at: s.0,
                });
            }
        }
        for r in rows {
            let m: DateTime<Utc> = r.get(0);
            let i = ((m - from).num_seconds() / secs) as usize;
            if let Some(Some(p)) = points.get_mut(i) {
                let users = r.get::<_, i32>(1).max(0) as u64;
                let resources = r.get::<_, i32>(2).max(0) as u64;
                if users > p.users {
                    p.users = users;
                    p.users_at = r.get(3);
                }
                p.resources = p.resources.max(resources);
            }
        }
    }
    // The other steps, in runs, from sessions.
    let mut budget = max;
    let mut i = 0;
    while i < steps.len() {
        if steps[i].2 {
            i += 1;
            continue;
        }
        let mut j = i;
        while j < steps.len() && !steps[j].2 {
            j += 1;
        }
        let (a, b) = (steps[i].0, steps[j - 1].1);
        let Some(rows) = spans_on(&tx, a, b, filter, budget).await? else {
            return Ok(Some(None));
        };
        budget -= rows.len();
        let spans: Vec<Span> = rows.into_iter().map(|r| r.span).collect();
        let part = analytics::concurrency(&spans, a, b, step, now);
        for (k, p) in part.points.into_iter().enumerate() {
            points[i + k] = Some(p);
        }
        i = j;
    }
    tx.commit().await?;
    let points: Vec<Point> = points.into_iter().flatten().collect();
    let mut peak = (from, 0u64);
    for p in &points {
        if p.users > peak.1 {
            peak = (p.users_at, p.users);
        }
    }
    Ok(Some(Some(Concurrency { points, peak })))
}

/// Deletes every built mark (`presence-bridge rollup --rebuild`): the builder computes them
/// all again from the sessions.
pub async fn rebuild(pool: &Pool) -> Result<u64, StoreError> {
    let c = pg::client(pool).await?;
    Ok(c.execute("DELETE FROM presence_rollup_days", &[]).await?)
}

/// The builder: at start and every [`EVERY`], builds the due days; logs and retries later on
/// errors (a dead database is the writer's to report).
pub async fn run(pool: Pool, retention_days: u32, cancel: CancellationToken) {
    loop {
        match build_due(&pool, retention_days, Utc::now()).await {
            Ok(days) if !days.is_empty() => {
                tracing::info!(days = days.len(), first = %days[0], "store: rollups built");
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "store: rollups not built this time"),
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::UserJid;
    use proptest::prelude::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn split_takes_built_whole_days_only() {
        let built: BTreeSet<NaiveDate> = [
            NaiveDate::from_ymd_opt(2026, 11, 2).unwrap(),
            NaiveDate::from_ymd_opt(2026, 11, 3).unwrap(),
            NaiveDate::from_ymd_opt(2026, 11, 5).unwrap(),
        ]
        .into();
        let s = split(t("2026-11-01T12:00:00Z"), t("2026-11-05T06:00:00Z"), &built);
        assert_eq!(s.days, built.iter().take(2).copied().collect::<Vec<_>>());
        assert_eq!(
            s.raw,
            vec![
                (t("2026-11-01T12:00:00Z"), t("2026-11-02T00:00:00Z")),
                (t("2026-11-04T00:00:00Z"), t("2026-11-05T06:00:00Z")),
            ]
        );
    }

    #[test]
    fn due_days_end_before_the_settle_time() {
        let d = due_days(t("2026-12-01T01:30:00Z"), 3);
        // 01:30 - 2 h is still Nov 30: the last complete day before it is Nov 29.
        assert_eq!(
            d,
            vec![
                NaiveDate::from_ymd_opt(2026, 11, 28).unwrap(),
                NaiveDate::from_ymd_opt(2026, 11, 29).unwrap()
            ]
        );
    }

    fn arb_spans() -> impl Strategy<Value = Vec<Span>> {
        // Three days from 2026-11-01, whole seconds, a few users on two domains.
        let base = t("2026-11-01T00:00:00Z");
        prop::collection::vec(
            (
                0usize..5,
                0usize..2,
                0usize..3,
                0i64..3 * 86_400,
                prop::option::of(0i64..40_000),
            ),
            0..40,
        )
        .prop_map(move |v| {
            v.into_iter()
                .map(|(u, d, r, s, len)| Span {
                    jid: UserJid::parse(&format!("u{u}@d{d}.example")).unwrap(),
                    resource: format!("r{r}"),
                    client: (r > 0).then(|| format!("c{r}")),
                    start: base + Duration::seconds(s),
                    end: len.map(|l| base + Duration::seconds(s + l)),
                })
                .collect()
        })
    }

    proptest! {
        /// Online time from day rollups + sessions for the partial days equals the answer
        /// from sessions alone, for every grouping.
        #[test]
        fn rolled_online_time_equals_the_direct_answer(spans in arb_spans(), a in 0i64..86_400 * 3, len in 1i64..86_400 * 3) {
            let base = t("2026-11-01T00:00:00Z");
            let now = t("2026-11-10T00:00:00Z");
            let (from, to) = (base + Duration::seconds(a), base + Duration::seconds(a + len));
            let days: Vec<NaiveDate> = (0..3).map(|i| base.date_naive() + Duration::days(i)).collect();
            let built: BTreeSet<NaiveDate> = days.iter().copied().collect();
            let parts = split(from, to, &built);
            for g in [Group::User, Group::Domain, Group::Client] {
                let mut totals: HashMap<String, (i64, u64)> = HashMap::new();
                for d in &parts.days {
                    let r = compute_day(&spans, day_start(*d), day_start(*d + Duration::days(1)), now);
                    let rows = if g == Group::Client { r.clients } else { r.users };
                    for (k, ms, n) in rows {
                        let k = if g == Group::Domain { k.split('@').nth(1).unwrap().to_owned() } else { k };
                        let e = totals.entry(k).or_default();
                        e.0 += ms;
                        e.1 += n;
                    }
                }
                for (i, &(pa, pb)) in parts.raw.iter().enumerate() {
                    for r in analytics::online_time(&spans, pa, pb, now, g, usize::MAX) {
                        totals.entry(r.key).or_default().0 += r.millis;
                    }
                    for (k, n) in started_in(&spans, pa, pb, g) {
                        totals.entry(k.to_owned()).or_default().1 += n;
                    }
                    if i == 0 && pa == from {
                        count_running(&spans, from, now, g, &mut totals);
                    }
                }
                if parts.raw.first().is_none_or(|p| p.0 != from) {
                    count_running(&spans, from, now, g, &mut totals);
                }
                let mut got: Vec<TimeRow> = totals.into_iter().map(|(key, (millis, sessions))| TimeRow { key, millis, sessions }).collect();
                got.sort_by(|a, b| b.millis.cmp(&a.millis).then_with(|| a.key.cmp(&b.key)));
                let want = analytics::online_time(&spans, from, to, now, g, usize::MAX);
                prop_assert_eq!(got, want, "group {:?}", g);
            }
        }

        /// Per-minute rollup points, merged into whole-minute steps, equal the direct answer.
        #[test]
        fn rolled_minutes_give_the_direct_concurrency(spans in arb_spans(), step_min in 1i64..180) {
            let base = t("2026-11-01T00:00:00Z");
            let now = t("2026-11-10T00:00:00Z");
            let (d0, d1) = (base, base + Duration::days(1));
            let r = compute_day(&spans, d0, d1, now);
            let step = Duration::minutes(step_min);
            let want = analytics::concurrency(&spans, d0, d1, step, now);
            let mut got: Vec<Point> = Vec::new();
            let mut s = d0;
            while s < d1 {
                got.push(Point { t: s, users: 0, resources: 0, users_at: s });
                s = (s + step).min(d1);
            }
            for (scope, p) in &r.minutes {
                if !scope.is_empty() { continue; }
                let i = ((p.t - d0).num_seconds() / step.num_seconds()) as usize;
                let q = &mut got[i];
                if p.users > q.users { q.users = p.users; q.users_at = p.users_at; }
                q.resources = q.resources.max(p.resources);
            }
            prop_assert_eq!(got, want.points);
        }
    }
}
