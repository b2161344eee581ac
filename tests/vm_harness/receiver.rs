//! The VM tests' ingest endpoint on 127.0.0.1:0: the tests' one receiver
//! (tests/common) answering 204 to a sample array and 400 to anything else,
//! its requests read as [`Post`]s with the samples parsed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use guest_agent::Sample;

use super::common::{self, Mode};

/// One request as received.
#[derive(Debug, Clone)]
pub struct Post {
    pub at: Instant,
    pub method: String,
    pub path: String,
    /// Header names lower-cased.
    pub headers: BTreeMap<String, String>,
    /// The body as a sample array, or why it is not one.
    pub samples: Result<Vec<Sample>, String>,
    /// The status it was answered with (0: none).
    #[allow(dead_code)] // read by the OpenRC test only
    pub status: u16,
}

pub struct Receiver {
    pub addr: SocketAddr,
    inner: common::Receiver,
    /// Requests already read as posts, so a wait does not parse them again.
    posts: Mutex<Vec<Post>>,
}

impl Receiver {
    pub fn start() -> Receiver {
        let inner = common::Receiver::start(Mode::Samples);
        Receiver {
            addr: inner.addr,
            inner,
            posts: Mutex::new(Vec::new()),
        }
    }

    /// From now on, answers every request with 503 and `Retry-After: 3600`
    /// (`true`: a manager that is down and asks the agent not to retry for
    /// an hour), or as before (`false`).
    #[allow(dead_code)] // used by the OpenRC test only
    pub fn refuse(&self, on: bool) {
        self.inner.set_mode(if on {
            Mode::Status(503, vec![("Retry-After".into(), "3600".into())])
        } else {
            Mode::Samples
        });
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every request so far.
    pub fn posts(&self) -> Vec<Post> {
        let mut posts = self.posts.lock().unwrap();
        for r in self.inner.requests().into_iter().skip(posts.len()) {
            let samples = serde_json::from_slice::<Vec<Sample>>(&r.body).map_err(|e| {
                format!(
                    "{e}: {}",
                    String::from_utf8_lossy(&r.body[..r.body.len().min(300)])
                )
            });
            posts.push(Post {
                at: r.at,
                method: r.method,
                path: r.path,
                headers: r.headers.into_iter().collect(),
                samples,
                status: r.answered,
            });
        }
        posts.clone()
    }

    /// Waits until `pred` over the requests so far gives a value; `None` at
    /// the deadline.
    pub fn wait_for<T>(
        &self,
        deadline: Instant,
        mut pred: impl FnMut(&[Post]) -> Option<T>,
    ) -> Option<T> {
        loop {
            if let Some(v) = pred(&self.posts()) {
                return Some(v);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
