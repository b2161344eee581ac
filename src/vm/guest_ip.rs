//! Telling a pull-model manager where the guest is (docs/manager.md).
//!
//! A manager that pulls `/metrics` learns a VM's address only from
//! `POST {manager_url}/v1/vms/{vm_id}/guest-ip` with `{"guest_ip": "a.b.c.d"}`;
//! until then it skips the VM. The old guest agent sent that every 5 s until
//! the first success, then every 30 s. This reporter keeps that schedule and
//! also reports at once when the address changes (a new DHCP lease), which it
//! checks every [`CHECK_EVERY`]: a connected UDP socket asks the routing table
//! for the source address toward the manager, without sending a packet.
//!
//! It runs on its own thread; every network wait has a deadline (the
//! request's `timeout`, and a bounded name lookup), so a manager that hangs
//! delays only the next report, never collection or pushing.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::collect::route;
use crate::config::Config;
use crate::config::key::Signing;
use crate::net::address::source_address;
use crate::net::client::Client;
use crate::net::url::{Target, UrlTemplate};
use crate::status::{GuestIpReport, GuestIpState, Status};
use crate::stop::Stop;

/// Time between attempts until a report succeeds (the old agent's 5 s).
pub const RETRY_EVERY: Duration = Duration::from_secs(5);
/// Time between reports of an unchanged address once one succeeded (the old
/// agent's 30 s): a manager that lost its database row learns it again.
pub const REFRESH_EVERY: Duration = Duration::from_secs(30);
/// How often the guest's address is looked at; a change is reported at once.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// The path under the manager's base URL, around the VM id. The VM id is
/// made of URL-safe characters only (its configuration check,
/// docs/design.md#configuration), so it goes into the path as it is.
pub fn report_url(base: &str, vm_id: &str) -> String {
    format!("{}/v1/vms/{vm_id}/guest-ip", base.trim_end_matches('/'))
}

/// The report's first state, as `/health` shows it before any attempt;
/// `None` when no manager URL is configured.
pub fn initial_report(config: &Config) -> Option<GuestIpReport> {
    let m = config.manager_url.as_ref()?;
    let (url, state, error) = match &config.vm_id {
        Some(id) => (report_url(m.as_str(), id), GuestIpState::Waiting, None),
        None => (
            report_url(m.as_str(), "{vm_id}"),
            GuestIpState::Off,
            Some("no vm_id configured (VM_ID in the config file)".to_string()),
        ),
    };
    Some(GuestIpReport {
        url,
        state,
        reported_ip: None,
        last_report_age_ms: None,
        reports: 0,
        consecutive_failures: 0,
        last_error: error,
    })
}

/// The reporter thread's state.
pub struct Reporter {
    status: Arc<Status>,
    template: UrlTemplate,
    vm_id: String,
    proc_root: PathBuf,
    client: Client,
    /// The manager's address, kept between attempts for the address check.
    manager: Option<SocketAddr>,
    /// The address seen at the last check.
    current: Option<IpAddr>,
    /// The address the manager last accepted.
    reported: Option<IpAddr>,
    next_attempt: Instant,
    said_no_route: bool,
    /// The restore generation last acted on (docs/snapshots.md).
    restores: u64,
    /// A restore was seen and its first sample (with the clone's `vm_id`)
    /// is awaited before reporting again.
    restore_pending: bool,
    /// The VM's key, when reports are signed (docs/security.md).
    signing: Option<Signing>,
    /// Set by a 401 or a restore: the key is read again before the next
    /// report.
    reload_key: bool,
}

impl Reporter {
    /// A reporter for `config`, when it names a manager URL and a VM id.
    pub fn new(config: &Config, status: Arc<Status>) -> Option<Reporter> {
        let template = config.manager_url.clone()?;
        let Some(vm_id) = config.vm_id.clone() else {
            log::warn!(
                "manager_url {} is set but vm_id is not: the guest's address cannot be reported",
                template.as_str()
            );
            return None;
        };
        let signing = Signing::new(config);
        let mut client = Client::tcp(config.timeout);
        client.sign_with(signing.as_ref().map(|s| s.credentials.clone()));
        Some(Reporter {
            status,
            template,
            vm_id,
            proc_root: config.proc_root.clone(),
            client,
            manager: None,
            current: None,
            reported: None,
            next_attempt: Instant::now(),
            said_no_route: false,
            restores: 0,
            restore_pending: false,
            signing,
            reload_key: false,
        })
    }

    /// Reports until `stop`.
    pub fn run(mut self, stop: &Stop) {
        loop {
            let now = Instant::now();
            self.after_restore(now);
            self.check_address(now);
            if now >= self.next_attempt && !self.restore_pending {
                self.attempt();
            }
            let wake = self.next_attempt.min(Instant::now() + CHECK_EVERY);
            if stop.wait_until(wake) {
                return;
            }
        }
    }

    /// After a snapshot restore this VM is a clone: its connections are the
    /// parent's, its address and its id (from MMDS) may differ. Once the
    /// first sample of the new run shows the id, the report is sent again
    /// at once.
    fn after_restore(&mut self, now: Instant) {
        let restores = self.status.restores();
        if restores != self.restores {
            self.restores = restores;
            self.restore_pending = true;
            self.client.disconnect();
            self.manager = None;
            self.reported = None;
            self.reload_key = self.signing.is_some();
        }
        if !self.restore_pending {
            return;
        }
        let Some(latest) = self.status.latest() else {
            return;
        };
        if latest.restore_count < self.restores {
            return;
        }
        if let Some(vm_id) = latest.vm_id.clone() {
            self.vm_id = vm_id;
        }
        self.restore_pending = false;
        self.next_attempt = now;
        log::info!("restored from a snapshot: reporting the guest's address again");
    }

    /// Looks at the guest's address toward the manager; a new one is due
    /// for a report at once.
    fn check_address(&mut self, now: Instant) {
        let Some(manager) = self.manager else {
            return;
        };
        let ip = source_address(manager).ok();
        if ip.is_some() && ip != self.current {
            if let (Some(old), Some(new)) = (self.reported, ip) {
                log::info!("guest address changed from {old} to {new}; telling the manager");
            }
            self.next_attempt = now;
        }
        self.current = ip;
    }

    /// One report: find the manager and the guest's address toward it, POST.
    fn attempt(&mut self) {
        if std::mem::take(&mut self.reload_key)
            && let Some(signing) = &self.signing
            && let Err(e) = signing.reload()
        {
            log::warn!("guest address report: reading the signing key again: {e}");
        }
        let url = match self.resolve() {
            Ok(url) => url,
            Err(why) => {
                if !self.said_no_route {
                    log::warn!("guest address report: {why}; trying again");
                    self.said_no_route = true;
                }
                self.status.report_failed(why);
                self.next_attempt = Instant::now() + RETRY_EVERY;
                return;
            }
        };
        self.said_no_route = false;
        let Some(ip) = self.current else {
            let why = format!("no route toward the manager at {url}");
            if self.status.report_failed(why.clone()) {
                log::warn!("guest address report: {why}; trying again");
            }
            self.next_attempt = Instant::now() + RETRY_EVERY;
            return;
        };
        match self.post(&url, ip) {
            Ok(()) => {
                if self.reported != Some(ip) {
                    log::info!("told the manager the guest's address {ip} ({url})");
                }
                self.reported = Some(ip);
                self.status.report_accepted(&ip.to_string());
                self.next_attempt = Instant::now() + REFRESH_EVERY;
            }
            Err(why) => {
                if self.status.report_failed(why.clone()) {
                    log::warn!(
                        "guest address report failed: {why}; retrying every {}s",
                        RETRY_EVERY.as_secs()
                    );
                }
                // The manager may have moved (DHCP): find it again.
                self.manager = None;
                self.next_attempt = Instant::now() + RETRY_EVERY;
            }
        }
    }

    /// The report URL with `{gateway}` filled in, and the manager's socket
    /// address (a name is looked up within the timeout); also takes the
    /// guest's current address toward it.
    fn resolve(&mut self) -> Result<String, String> {
        let gateway = if self.template.needs_gateway() {
            route::default_gateway(&self.proc_root).map_err(|e| e.to_string())?
        } else {
            None
        };
        let target = self
            .template
            .resolve(gateway)
            .ok_or_else(|| format!("no default route yet for {}", self.template.as_str()))?;
        let addr = match target.literal() {
            Some(a) => a,
            None => self
                .client
                .lookup(&target.host, target.port)
                .map_err(|e| e.to_string())?,
        };
        self.manager = Some(addr);
        self.current = source_address(addr).ok();
        Ok(report_url(&target.url, &self.vm_id))
    }

    fn post(&mut self, url: &str, ip: IpAddr) -> Result<(), String> {
        let target = Target::http(url).map_err(|e| format!("{url}: {e}"))?;
        // An address's text needs no JSON escaping.
        let body = format!("{{\"guest_ip\":\"{ip}\"}}");
        let answer = self
            .client
            .post(
                &target,
                &[("content-type", "application/json")],
                body.as_bytes(),
                None,
            )
            .map_err(|e| format!("{url}: {e}"))?;
        let text = String::from_utf8_lossy(self.client.body());
        match answer.status {
            200..=299 => Ok(()),
            status @ (401 | 403) => {
                self.reload_key = status == 401 && self.signing.is_some();
                Err(format!(
                    "{url}: HTTP {status}: {}",
                    crate::deliver::push::refusal_reason(self.client.body())
                ))
            }
            status @ (400 | 404 | 422) => Err(format!(
                "{url}: HTTP {status} {}: does the manager know this VM as {:?}?",
                text.chars().take(200).collect::<String>().trim(),
                self.vm_id
            )),
            status => Err(format!("{url}: HTTP {status}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_url_joins_base_and_vm_id() {
        assert_eq!(
            report_url("http://10.0.2.2:18080/", "6f1c"),
            "http://10.0.2.2:18080/v1/vms/6f1c/guest-ip"
        );
        assert_eq!(
            report_url("http://10.0.2.2:18080", "6f1c"),
            "http://10.0.2.2:18080/v1/vms/6f1c/guest-ip"
        );
    }
}
