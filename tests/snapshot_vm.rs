//! Snapshot clones never speak with their parent's identity
//! (docs/snapshots.md).
//!
//! In a real VM: QEMU q35 under TCG with a `vmgenid` device boots Debian's
//! generic kernel and the static agent, configured by the kernel command
//! line plus an MMDS stand-in reached through `guestfwd`, pushing through
//! user networking to a receiver on host loopback. The VM is saved, then two
//! clones resume the saved state with their own VMGenID and their own MMDS
//! answer, and a control resumes it with the parent's VMGenID.
//!
//! In-process: the same restore path, with the kernel log replaced by a
//! plain file the test writes the kernel's line into.
//!
//! Without QEMU or the kernel the VM test says SKIPPED on stderr and passes,
//! unless `CI=true` or `GUEST_AGENT_VM_TEST=require`: then it fails.

// The shared harness is used in part here.
#[allow(dead_code, unused_imports)]
mod vm_harness;

mod snapshot_harness;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use guest_agent::Sample;
use snapshot_harness::mmds_stand_in::MmdsStandIn;
use snapshot_harness::{MMDS_ADDR, Q35, Spec};
use vm_harness::{Post, Receiver, assert_no_gaps, report, samples};

const INGEST_PATH: &str = "/v1/guest-metrics";
const GUID_PARENT: &str = "5b0a6a0e-7f0c-4d3a-9d55-0a7c3e1f2b01";
const GUID_A: &str = "5b0a6a0e-7f0c-4d3a-9d55-0a7c3e1f2b0a";
const GUID_B: &str = "5b0a6a0e-7f0c-4d3a-9d55-0a7c3e1f2b0b";
const VM_FORK_LINE: &str = "crng reseeded due to virtual machine fork";

fn document(vm_id: &str) -> String {
    format!(r#"{{"guest_agent": {{"vm_id": "{vm_id}"}}, "latest": {{"meta-data": {{}}}}}}"#)
}

/// Every sample received, each (run_id, seq) checked to carry one payload
/// only: a re-sent sample is allowed, a different one under the same key is
/// what a de-duplicating manager would silently lose.
fn assert_keys_unique(posts: &[Post]) -> BTreeMap<(String, u64), Sample> {
    let mut seen: BTreeMap<(String, u64), Sample> = BTreeMap::new();
    for s in posts
        .iter()
        .filter_map(|p| p.samples.as_ref().ok())
        .flatten()
    {
        let key = (s.run_id.clone(), s.seq);
        match seen.get(&key) {
            Some(first) => assert_eq!(
                first, s,
                "two different samples under run_id {} seq {}",
                key.0, key.1
            ),
            None => {
                seen.insert(key, s.clone());
            }
        }
    }
    seen
}

fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

#[test]
fn clones_of_a_snapshot_each_start_their_own_run() {
    let Some(assets) = snapshot_harness::ready("clones_of_a_snapshot_each_start_their_own_run")
    else {
        return;
    };
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(600);
    let receiver = Receiver::start();
    let cmdline = vec![
        format!(
            "guest_agent.url=http://{{gateway}}:{}{INGEST_PATH}",
            receiver.port()
        ),
        "guest_agent.interval=1s".into(),
        // Shared by every clone: MMDS must win over it.
        "guest_agent.vm_id=from-cmdline".into(),
        "guest_agent.listen=off".into(),
        format!("guest_agent.mmds={MMDS_ADDR}"),
    ];
    let state_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/vm-logs");
    std::fs::create_dir_all(&state_dir).unwrap();
    let state = state_dir.join(format!("snapshot-{}.state", std::process::id()));

    // The parent: boots, reads its identity from MMDS, pushes a few samples.
    let parent_mmds = MmdsStandIn::start(&document("parent"));
    let mut parent = Q35::start(
        assets,
        Spec {
            name: "snapshot-parent",
            vmgenid: GUID_PARENT,
            mmds_port: parent_mmds.port(),
            cmdline: cmdline.clone(),
            incoming: None,
        },
    );
    parent.wait_console("@@GA agent-started", 0, deadline);
    let booted = t0.elapsed();
    let parent_run = receiver
        .wait_for(deadline, |posts| {
            let s: Vec<_> = samples(posts)
                .into_iter()
                .filter(|s| s.vm_id.as_deref() == Some("parent"))
                .collect();
            (s.len() >= 3).then(|| s[0].run_id.clone())
        })
        .unwrap_or_else(|| panic!("no 3 samples from the parent: {:?}", receiver.posts()));
    let save_took = parent.save(&state, deadline);
    drop(parent);
    let state_bytes = std::fs::metadata(&state).map(|m| m.len()).unwrap_or(0);
    report(format_args!(
        "snapshot vm: kernel {}, parent up in {}, saved {} MB in {}",
        assets.kernel_version,
        secs(booted),
        state_bytes / 1_000_000,
        secs(save_took)
    ));

    // Two clones of the one snapshot, each with its own VMGenID and MMDS answer.
    let mut clone_runs = Vec::new();
    for (name, guid, vm_id) in [
        ("snapshot-clone-a", GUID_A, "clone-a"),
        ("snapshot-clone-b", GUID_B, "clone-b"),
    ] {
        let mmds = MmdsStandIn::start(&document(vm_id));
        let mut vm = Q35::start(
            assets,
            Spec {
                name,
                vmgenid: guid,
                mmds_port: mmds.port(),
                cmdline: cmdline.clone(),
                incoming: Some(&state),
            },
        );
        let cont = vm.resume(deadline);
        vm.wait_console(VM_FORK_LINE, 0, deadline);
        let (first_at, run) = receiver
            .wait_for(deadline, |posts| {
                let first = posts.iter().find_map(|p| {
                    let s = p.samples.as_ref().ok()?;
                    s.iter()
                        .find(|s| s.vm_id.as_deref() == Some(vm_id))
                        .map(|s| (p.at, s.run_id.clone()))
                })?;
                let n = samples(posts)
                    .iter()
                    .filter(|s| s.run_id == first.1)
                    .count();
                (n >= 3).then_some(first)
            })
            .unwrap_or_else(|| panic!("{name}: no 3 samples under a new run"));
        let mmds_log = mmds.requests();
        assert!(
            mmds_log.iter().any(|r| r.method == "PUT")
                && mmds_log
                    .iter()
                    .any(|r| r.method == "GET" && r.path == "/guest_agent"),
            "{name}: MMDS was not read again after the restore: {mmds_log:?}"
        );
        report(format_args!(
            "snapshot vm: {name}: first sample of its new run {} after cont",
            secs(first_at.saturating_duration_since(cont))
        ));
        clone_runs.push((vm_id, run));
        drop(vm);
    }

    // The control: the parent's VMGenID again. Nothing tells the guest it
    // was saved and resumed, so it goes on with the parent's run.
    let control_mmds = MmdsStandIn::start(&document("control"));
    let mut control = Q35::start(
        assets,
        Spec {
            name: "snapshot-same-guid",
            vmgenid: GUID_PARENT,
            mmds_port: control_mmds.port(),
            cmdline: cmdline.clone(),
            incoming: Some(&state),
        },
    );
    let before = receiver.posts().len();
    control.resume(deadline);
    receiver
        .wait_for(deadline, |posts| {
            let later: Vec<Post> = posts[before.min(posts.len())..].to_vec();
            (samples(&later).len() >= 3).then_some(())
        })
        .expect("control: no 3 samples");
    let control_samples = samples(&receiver.posts()[before..]);
    assert!(
        control.lines().iter().all(|l| !l.contains(VM_FORK_LINE)),
        "the same VMGenID must not make the kernel report a fork"
    );
    for s in &control_samples {
        assert_eq!(
            s.run_id, parent_run,
            "control continues the parent's run: {s:?}"
        );
        assert_eq!(s.restore_count, 0, "{s:?}");
        assert_eq!(s.restored_from_run_id, None, "{s:?}");
        assert_eq!(s.vm_id.as_deref(), Some("parent"), "{s:?}");
    }
    assert!(
        control_mmds.requests().is_empty(),
        "no restore was seen, so MMDS was not asked again"
    );
    drop(control);
    let _ = std::fs::remove_file(&state);

    // What the manager received.
    let posts = receiver.posts();
    vm_harness::assert_wire_contract(&posts, INGEST_PATH);
    let all = assert_keys_unique(&posts);
    let run_of = |run: &str| -> Vec<&Sample> {
        all.iter()
            .filter(|((r, _), _)| r == run)
            .map(|(_, s)| s)
            .collect()
    };
    let parent_samples = run_of(&parent_run);
    let seqs: Vec<u64> = parent_samples.iter().map(|s| s.seq).collect();
    assert_no_gaps("parent's run (control included)", &seqs);
    for s in &parent_samples {
        assert_eq!(s.vm_id.as_deref(), Some("parent"), "MMDS beats the cmdline");
        assert_eq!(
            (s.restore_count, s.restored_from_run_id.as_deref()),
            (0, None)
        );
    }
    let mut run_ids = vec![parent_run.clone()];
    for (vm_id, run) in &clone_runs {
        let clone_samples = run_of(run);
        let seqs: Vec<u64> = clone_samples.iter().map(|s| s.seq).collect();
        assert_no_gaps(&format!("{vm_id}'s run"), &seqs);
        for s in clone_samples {
            assert_eq!(s.vm_id.as_deref(), Some(*vm_id), "{s:?}");
            assert_eq!(s.restore_count, 1, "{s:?}");
            assert_eq!(s.restored_from_run_id.as_deref(), Some(parent_run.as_str()));
        }
        run_ids.push(run.clone());
    }
    run_ids.sort();
    run_ids.dedup();
    assert_eq!(
        run_ids.len(),
        3,
        "parent and clones have three different runs"
    );
    assert_eq!(
        all.len(),
        samples(&posts).len(),
        "every sample is under exactly one key"
    );
    report(format_args!(
        "snapshot vm: whole test {} ({} samples, {} runs)",
        secs(t0.elapsed()),
        all.len(),
        run_ids.len()
    ));
}

/// The restore path without a VM: the kernel log is a file this test
/// appends the kernel's line to, MMDS a stand-in on loopback.
#[test]
fn a_restore_signal_starts_a_new_run_in_process() {
    let receiver = Receiver::start();
    let mmds = MmdsStandIn::start(&document("before"));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let kmsg = dir.join("kmsg");
    std::fs::write(&kmsg, "6,1,1,-;an old message\n").unwrap();
    let conf = dir.join("guest-agent.conf");
    std::fs::write(&conf, "VM_ID=from-file\n").unwrap();
    let url = format!("http://127.0.0.1:{}{INGEST_PATH}", receiver.port());
    let config = guest_agent::config::resolve(
        &[
            ("url", url),
            ("interval", "200ms".into()),
            ("listen", "off".into()),
            ("kmsg", kmsg.display().to_string()),
            ("mmds", mmds.addr().to_string()),
            // The drop-in mode's address report (docs/manager.md) is sent
            // again after a restore, under the clone's id.
            (
                "manager_url",
                format!("http://127.0.0.1:{}", receiver.port()),
            ),
        ],
        &[],
        Some(&conf),
    )
    .unwrap();
    // MMDS ranks above the file, at start and after a restore.
    assert_eq!(config.vm_id.as_deref(), Some("before"));
    let origin = |name: &str| {
        config
            .origins
            .iter()
            .find(|o| o.setting.name == name)
            .map(|o| o.source.as_str())
    };
    assert_eq!(origin("mmds"), Some("cli"));

    let running = guest_agent::agent::start(config).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let first_run = receiver
        .wait_for(deadline, |posts| {
            let s = samples(posts);
            (s.len() >= 3).then(|| s[0].run_id.clone())
        })
        .expect("3 samples before the restore");
    mmds.set_document(&document("after"));
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&kmsg)
        .unwrap();
    writeln!(f, "5,2,2,-;random: {VM_FORK_LINE}").unwrap();
    let new_run = receiver
        .wait_for(deadline, |posts| {
            let s = samples(posts);
            let new: Vec<_> = s.iter().filter(|s| s.run_id != first_run).collect();
            (new.len() >= 3).then(|| new[0].run_id.clone())
        })
        .expect("3 samples of a new run after the restore signal");
    let reported = |posts: &[Post], id: &str| {
        posts
            .iter()
            .any(|p| p.path == format!("/v1/vms/{id}/guest-ip"))
            .then_some(())
    };
    receiver
        .wait_for(deadline, |posts| reported(posts, "before"))
        .expect("the guest address reported under the first id");
    receiver
        .wait_for(deadline, |posts| reported(posts, "after"))
        .expect("the guest address reported again under the clone's id");
    running.stop();

    let posts = receiver.posts();
    let all = assert_keys_unique(&posts);
    let old: Vec<&Sample> = all.values().filter(|s| s.run_id == first_run).collect();
    let new: Vec<&Sample> = all.values().filter(|s| s.run_id == new_run).collect();
    assert_eq!(old.len() + new.len(), all.len(), "two runs only");
    assert_no_gaps("first run", &old.iter().map(|s| s.seq).collect::<Vec<_>>());
    assert_no_gaps("new run", &new.iter().map(|s| s.seq).collect::<Vec<_>>());
    for s in old {
        assert_eq!(
            (s.restore_count, s.restored_from_run_id.as_deref()),
            (0, None)
        );
        assert_eq!(s.vm_id.as_deref(), Some("before"));
    }
    for s in new {
        assert_eq!(s.restore_count, 1);
        assert_eq!(s.restored_from_run_id.as_deref(), Some(first_run.as_str()));
        assert_eq!(s.vm_id.as_deref(), Some("after"), "identity read again");
    }
    // A token and a document at start, and again after the restore.
    assert_eq!(mmds.requests().len(), 4, "{:?}", mmds.requests());
}

/// MMDS outranks the cmdline and the file, and `--print-config` names it.
#[test]
fn mmds_values_rank_above_the_cmdline_and_file_and_show_as_mmds() {
    let mmds = MmdsStandIn::start(
        r#"{"guest_agent": {"vm_id": "from-mmds", "interval": "7s", "token": "mmds-secret"}}"#,
    );
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("guest-agent.conf");
    std::fs::write(&conf, "VM_ID=from-file\n").unwrap();
    let config = guest_agent::config::resolve(
        &[("url", "off".into()), ("listen", "off".into())],
        &[
            ("GUEST_AGENT_MMDS".into(), mmds.addr().to_string()),
            ("GUEST_AGENT_BATCH".into(), "7".into()),
        ],
        Some(&conf),
    )
    .unwrap();
    assert_eq!(config.vm_id.as_deref(), Some("from-mmds"));
    assert_eq!(config.interval, Duration::from_secs(7));
    let printed = config.to_json();
    assert_eq!(printed["vm_id"]["source"], "mmds");
    assert_eq!(printed["interval"]["source"], "mmds");
    assert_eq!(printed["batch"]["source"], "env");
    assert_eq!(printed["mmds"]["source"], "env");
    assert_eq!(printed["token"]["source"], "mmds");
    let text = printed.to_string();
    assert!(
        !text.contains("mmds-secret"),
        "a token is never printed: {text}"
    );
    assert_eq!(printed["token"]["value"], "set");

    // Opted in but nobody answers: an error that names MMDS, the rest goes on.
    let gone = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = guest_agent::config::resolve(
        &[
            ("url", "off".into()),
            ("listen", "off".into()),
            ("mmds", gone.to_string()),
            ("vm_id", "still-here".into()),
        ],
        &[],
        Some(&dir.path().join("none.conf")),
    )
    .unwrap();
    assert_eq!(config.vm_id.as_deref(), Some("still-here"));
    assert!(
        config.errors.iter().any(|e| e.contains("mmds")),
        "{:?}",
        config.errors
    );
}
