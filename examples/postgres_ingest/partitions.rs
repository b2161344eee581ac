//! Daily partitions of both tables and their retention
//! (docs/manager.md, "Partitions and retention"): the route runs
//! `metrics.maintain_partitions` at start and on a timer, so the partitions
//! a sample may land in exist before it comes and the old ones go without
//! a `DELETE`.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPool;

/// How long and how far ahead partitions are kept.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// How long the JSONB copy is kept: as long as de-duplication needs it
    /// (longer than a sample can wait in an agent). A sample older than
    /// this is not stored; it is answered 200 and counted in `expired`.
    pub samples: Duration,
    /// How long `vm_metrics` rows are kept: as long as the manager wants
    /// its history. At least `samples`.
    pub metrics: Duration,
    /// Days of partitions created ahead of today (UTC). A sample stamped
    /// later than that is refused (422): its guest's clock is wrong.
    pub days_ahead: u32,
    /// How often the partitions are created and dropped.
    pub every: Duration,
}

impl Default for Retention {
    fn default() -> Retention {
        Retention {
            samples: Duration::from_secs(2 * 86_400),
            metrics: Duration::from_secs(7 * 86_400),
            days_ahead: 2,
            every: Duration::from_secs(3600),
        }
    }
}

impl Retention {
    /// Refuses settings the database function would refuse.
    pub fn check(&self) -> Result<(), String> {
        if self.samples > self.metrics {
            return Err(format!(
                "the samples' retention ({}) is longer than vm_metrics' ({}): a sample kept for \
                 de-duplication would have no vm_metrics partition",
                humantime::format_duration(self.samples),
                humantime::format_duration(self.metrics)
            ));
        }
        if self.samples < Duration::from_secs(3600) {
            return Err(format!(
                "the samples' retention ({}) is under an hour: resends would be stored twice",
                humantime::format_duration(self.samples)
            ));
        }
        Ok(())
    }
}

/// Creates the partitions due and drops the expired ones, once: what was
/// done, one line per partition. A lock wait over 2 s gives up (the next
/// run does it), so a long query on a table never stalls the route.
pub async fn maintain(pool: &PgPool, r: &Retention) -> Result<Vec<String>, String> {
    let mut tx = pool
        .begin()
        .await
        .map_err(|e| format!("maintaining partitions, opening a transaction: {e}"))?;
    sqlx::query("SET LOCAL lock_timeout = '2s'")
        .execute(&mut *tx)
        .await
        .map_err(|e| format!("maintaining partitions, setting lock_timeout: {e}"))?;
    let done: Vec<String> = sqlx::query_scalar(
        "SELECT line FROM metrics.maintain_partitions(make_interval(secs => $1), \
         make_interval(secs => $2), $3) AS line",
    )
    .bind(r.samples.as_secs_f64())
    .bind(r.metrics.as_secs_f64())
    .bind(i32::try_from(r.days_ahead).unwrap_or(i32::MAX))
    .fetch_all(&mut *tx)
    .await
    .map_err(|e| format!("metrics.maintain_partitions: {e}"))?;
    tx.commit()
        .await
        .map_err(|e| format!("maintaining partitions, committing: {e}"))?;
    Ok(done)
}

/// Runs [`maintain`] every `r.every`, and at once when `wake` is notified
/// (a write found no partition for its rows). Failures are logged and
/// tried again at the next turn.
pub async fn keep_maintained(pool: PgPool, r: Retention, wake: Arc<tokio::sync::Notify>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(r.every) => {}
            _ = wake.notified() => {}
        }
        match maintain(&pool, &r).await {
            Ok(done) => {
                for line in done {
                    eprintln!("postgres_ingest: {line}");
                }
            }
            Err(e) => eprintln!(
                "postgres_ingest: {e}; trying again in {}",
                humantime::format_duration(r.every)
            ),
        }
    }
}
