//! The push route as a manager built on axum 0.7 and tokio mounts it
//! (docs/manager.md, "Adding the push route to your manager"): the library's
//! ingest kit does the validation, de-duplication and status codes; the
//! route only hands it the body and keeps each VM's latest sample.
//!
//! ```text
//! cargo run --example axum_ingest -- [127.0.0.1:18080] [--key-file FILE]
//! curl http://127.0.0.1:18080/v1/guest-metrics/VM_ID/latest
//! ```
//!
//! With master keys (`--key-file`, lines `KID HEX`; [`Store::with_keys`])
//! every push must be signed with its VM's key (docs/security.md): the
//! signature is checked on the raw body before anything parses it (401
//! with the reason), then every sample must be the signer's VM (403);
//! nothing of a refused body is stored.
//!
//! In a manager, `router` is merged into the application's own router
//! (`Router::merge`, or its routes added beside `/v1/vms`), and the stored
//! samples go to its database, where a unique key on (`run_id`, `seq`)
//! backs the kit's in-memory de-duplication across restarts. axum and tokio
//! are dev-dependencies of this crate: nothing here reaches the agent's
//! binary.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use guest_agent::Sample;
use guest_agent::ingest::{self, Ingest, Verifier};

/// What the route keeps: the kit's state and each VM's newest sample.
#[derive(Default)]
pub struct Store {
    ingest: Ingest,
    latest: HashMap<String, Sample>,
    /// Master keys: when set, only signed pushes are stored.
    verifier: Option<Verifier>,
}

impl Store {
    /// A store that requires every push to be signed with a key derived
    /// from one of these master keys.
    pub fn with_keys(verifier: Verifier) -> Store {
        Store {
            verifier: Some(verifier),
            ..Store::default()
        }
    }
}

/// The state shared by the handlers. A plain mutex: it is never held across
/// an `.await`.
pub type AppState = Arc<Mutex<Store>>;

fn lock(state: &AppState) -> MutexGuard<'_, Store> {
    // The store holds plain data that every handler leaves consistent.
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// The VM's newest sample stored so far.
pub fn latest(state: &AppState, vm_id: &str) -> Option<Sample> {
    lock(state).latest.get(vm_id).cloned()
}

/// `POST /v1/guest-metrics` (the kit's answers: 200 with counts, 400, 413,
/// 422) and `GET /v1/guest-metrics/:vm_id/latest`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/guest-metrics", post(push))
        .route("/v1/guest-metrics/:vm_id/latest", get(latest_sample))
        // Over the kit's limit axum answers 413 before the handler runs, and
        // the agent halves its batch.
        .layer(DefaultBodyLimit::max(ingest::MAX_BODY))
        .with_state(state)
}

async fn push(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut store = lock(&state);
    // The signature first, on the raw body: who the request speaks for.
    // `@path` is the path the agent sent: a router nested under a prefix
    // takes it from `OriginalUri` (axum's `original-uri` feature) instead.
    let signer = match &store.verifier {
        Some(v) => {
            let fields: Vec<(&str, &[u8])> = headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_bytes()))
                .collect();
            match v.verify(method.as_str(), uri.path(), &fields, &body) {
                Ok(signer) => Some(signer),
                Err(rejection) => return respond(rejection.reply()),
            }
        }
        None => None,
    };
    let prepared = match &signer {
        Some(s) => store.ingest.prepare_for_vm(&body, &s.vm_id),
        None => store.ingest.prepare(&body),
    };
    let batch = match prepared {
        Ok(b) => b,
        Err(refusal) => return respond(refusal.reply()),
    };
    for c in batch.conflicts() {
        eprintln!(
            "axum_ingest: run {} seq {} (vm {}) was stored before with a different payload; the first is kept",
            c.run_id,
            c.seq,
            c.vm_id.as_deref().unwrap_or("?")
        );
    }
    for s in batch.fresh() {
        // A VM without an id is known by its agent run.
        let key = s.vm_id.clone().unwrap_or_else(|| s.run_id.clone());
        let newer = store
            .latest
            .get(&key)
            .is_none_or(|old| (s.timestamp_ms, s.seq) > (old.timestamp_ms, old.seq));
        if newer {
            store.latest.insert(key, s.clone());
        }
    }
    // In a manager: write batch.fresh() to the database first, answer
    // `ingest::Reply::store_failed` if that fails, and commit only after.
    store.ingest.commit(&batch);
    respond(batch.reply())
}

async fn latest_sample(State(state): State<AppState>, Path(vm_id): Path<String>) -> Response {
    match latest(&state, &vm_id) {
        Some(s) => axum::Json(s).into_response(),
        None => (StatusCode::NOT_FOUND, "no sample from this VM yet\n").into_response(),
    }
}

/// The kit's reply as an axum response.
fn respond(reply: ingest::Reply) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, ingest::Reply::CONTENT_TYPE)],
        reply.body,
    )
        .into_response()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut listen = "127.0.0.1:18080".to_string();
    let mut store = Store::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--key-file" {
            let Some(path) = args.next() else {
                eprintln!("axum_ingest: --key-file needs a file of master keys");
                std::process::exit(2);
            };
            match Verifier::load(std::path::Path::new(&path)) {
                Ok(v) => store = Store::with_keys(v),
                Err(e) => {
                    eprintln!("axum_ingest: {e}");
                    std::process::exit(2);
                }
            }
        } else {
            listen = arg;
        }
    }
    let listener = match tokio::net::TcpListener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("axum_ingest: cannot listen on {listen}: {e}");
            std::process::exit(2);
        }
    };
    match listener.local_addr() {
        Ok(a) => println!("listening on {a}"),
        Err(e) => eprintln!("axum_ingest: {e}"),
    }
    let state = Arc::new(Mutex::new(store));
    if let Err(e) = axum::serve(listener, router(state)).await {
        eprintln!("axum_ingest: {e}");
        std::process::exit(1);
    }
}
