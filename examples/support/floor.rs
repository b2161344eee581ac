//! The floor probe: only the work no collector of the sample can avoid.
//!
//! One thread; the nine /proc files of a sample kept open and re-read from
//! offset 0 until end of file (as the agent's `ProcFile` does); the
//! processes counted by the agent's own `ProcessCounter` (the proc root kept
//! open and listed with `getdents64`); and one fixed body POSTed on a
//! kept-alive loopback connection, its answer read. No parsing, no JSON, no allocation after the
//! first round. It is what the agent's cost is compared with
//! (docs/performance.md).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use guest_agent::collect::processes::ProcessCounter;
use guest_agent::internals::{Client, Target};
use http::Method;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};

/// The nine files every sample reads.
pub const NINE_FILES: [&str; 9] = [
    "stat",
    "meminfo",
    "loadavg",
    "uptime",
    "net/dev",
    "diskstats",
    "pressure/cpu",
    "pressure/memory",
    "pressure/io",
];

/// Bytes of the fixed body: about one sample of the agent's JSON.
pub const BODY_BYTES: usize = 900;

/// A client, its target and the headers of every post.
type ViaUreq = (Client, Target, Vec<(HeaderName, HeaderValue)>);

/// The probe's kept-open files, directory and connection.
pub struct Floor {
    files: Vec<File>,
    buf: Vec<u8>,
    processes: ProcessCounter,
    addr: SocketAddr,
    request: Vec<u8>,
    conn: Option<TcpStream>,
    answer: Vec<u8>,
    /// Post through ureq instead of the raw connection, with the agent's
    /// own client and the headers a push sends.
    ureq: Option<ViaUreq>,
    /// The last round's figures, so nothing is optimised away.
    pub last: (usize, u64),
}

impl Floor {
    /// Opens the files under `proc_root` (those that exist) and builds the
    /// request for `addr` and `path`.
    pub fn new(proc_root: &Path, addr: SocketAddr, path: &str) -> std::io::Result<Floor> {
        let files = NINE_FILES
            .iter()
            .map(|f| File::open(proc_root.join(f)))
            .collect::<std::io::Result<Vec<File>>>()?;
        // The agent's own counter: the same kept-open directory and
        // reused `getdents64` buffer, and nothing more.
        let mut processes = ProcessCounter::new(proc_root);
        processes.count()?;
        let mut body = b"[{\"schema\":1".to_vec();
        while body.len() < BODY_BYTES - 2 {
            body.extend_from_slice(b",\"f\":0");
        }
        body.truncate(BODY_BYTES - 2);
        body.extend_from_slice(b"}]");
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\nuser-agent: floor-probe\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(&body);
        Ok(Floor {
            files,
            buf: vec![0; 64 * 1024],
            processes,
            addr,
            request,
            conn: None,
            answer: vec![0; 4096],
            ureq: None,
            last: (0, 0),
        })
    }

    /// One round: read the files, list the directory, post the body.
    pub fn once(&mut self) -> std::io::Result<()> {
        let bytes = self.read_files()?;
        let procs = self.count_processes()?;
        self.last = (bytes, procs);
        self.post()
    }

    /// Reads every file from offset 0 until end of file.
    pub fn read_files(&mut self) -> std::io::Result<usize> {
        self.read_each(|_, _| {})
    }

    /// Reads every file, handing each one's text (and its index in
    /// [`NINE_FILES`]) to `each`.
    pub fn read_each(&mut self, mut each: impl FnMut(usize, &[u8])) -> std::io::Result<usize> {
        let mut total = 0;
        for (i, f) in self.files.iter().enumerate() {
            let mut off = 0;
            loop {
                let n = f.read_at(&mut self.buf[off..], off as u64)?;
                if n == 0 {
                    break;
                }
                off += n;
                if off == self.buf.len() {
                    return Err(std::io::Error::other("file larger than the probe's buffer"));
                }
            }
            each(i, &self.buf[..off]);
            total += off;
        }
        Ok(total)
    }

    /// Numeric entries of the proc root.
    pub fn count_processes(&mut self) -> std::io::Result<u64> {
        self.processes.count()
    }

    /// Posts through ureq set up exactly as the agent's sender is (its own
    /// `Client`: the resolver that spawns no thread, one kept connection,
    /// one deadline, no proxy, no redirects), to `url`.
    pub fn use_ureq(&mut self, url: &str) -> std::io::Result<()> {
        let target = Target::http(url).map_err(std::io::Error::other)?;
        let headers = vec![(CONTENT_TYPE, HeaderValue::from_static("application/json"))];
        self.ureq = Some((Client::tcp(Duration::from_secs(2)), target, headers));
        Ok(())
    }

    /// The fixed POST, reconnecting once if the kept-alive connection closed.
    pub fn post(&mut self) -> std::io::Result<()> {
        if let Some((client, target, headers)) = &mut self.ureq {
            let head = self.request.len() - BODY_BYTES;
            client
                .send(
                    Method::POST,
                    target,
                    headers,
                    Some(&self.request[head..]),
                    None,
                )
                .map_err(std::io::Error::other)?;
            return Ok(());
        }
        match self.post_once() {
            Ok(()) => Ok(()),
            Err(_) => {
                self.conn = None;
                self.post_once()
            }
        }
    }

    fn post_once(&mut self) -> std::io::Result<()> {
        if self.conn.is_none() {
            let c = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2))?;
            c.set_nodelay(true)?;
            c.set_read_timeout(Some(Duration::from_secs(2)))?;
            self.conn = Some(c);
        }
        let Some(conn) = self.conn.as_mut() else {
            unreachable!("connected above")
        };
        conn.write_all(&self.request)?;
        // The receiver answers with a head and no body: read up to its end.
        let mut got = 0;
        loop {
            let n = conn.read(&mut self.answer[got..])?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            got += n;
            if self.answer[..got].ends_with(b"\r\n\r\n") {
                return Ok(());
            }
            if got == self.answer.len() {
                return Err(std::io::Error::other("answer too long"));
            }
        }
    }
}

/// Sleeps until the tick after `next` on a fixed cadence, or resumes from
/// now when the last round ran past it: the probe's and the scraper's loop.
pub fn wait_for_next_tick(next: &mut Instant, interval: Duration) {
    *next += interval;
    let now = Instant::now();
    if *next > now {
        std::thread::sleep(*next - now);
    } else {
        *next = now;
    }
}
