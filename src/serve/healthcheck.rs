//! `guest-agent --health`: asks the agent running on this machine for its
//! `/health`, with one deadline over the whole exchange, and turns the answer
//! into an exit code. It is the OpenRC service's health check
//! (docs/openrc.md#the-health-check): it needs no other program in the image
//! (busybox `wget -T` crashes on some busybox builds), and it finds the
//! listener from the same sources, in the same order, as the agent itself
//! (docs/design.md#configuration), so a listener moved by a kernel cmdline
//! key or by `/etc/guest-agent.conf` is still the one asked.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use http::Method;

use crate::config::Config;
use crate::net::client::{Client, Error as ClientError};
use crate::net::url::Target;

/// The whole exchange (connect, request, answer) must end within this: a
/// stopped or wedged agent still accepts connections (the kernel completes
/// the handshake) but never answers.
pub const DEADLINE: Duration = Duration::from_secs(5);

/// What the listener said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// A 2xx answer, with its body (the `/health` JSON).
    Healthy(String),
    /// Anything else, as one line naming the address and what went wrong.
    Unhealthy(String),
    /// The listener is configured off: there is nobody to ask.
    ListenerOff,
}

/// The address to connect to for a listener bound to `listen`: a wildcard
/// bind is reached on the loopback address of its family.
pub fn target(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// `GET /health` on the listener at `listen` (or [`Health::ListenerOff`]),
/// all of it within `deadline`.
pub fn check(listen: Option<SocketAddr>, deadline: Duration) -> Health {
    let Some(listen) = listen else {
        return Health::ListenerOff;
    };
    let addr = target(listen);
    match ask(addr, deadline) {
        Ok((status, body)) if (200..300).contains(&status) => Health::Healthy(body),
        Ok((status, body)) => Health::Unhealthy(format!(
            "http://{addr}/health answered {status}: {}",
            one_line(&body)
        )),
        Err(why) => Health::Unhealthy(format!("http://{addr}/health: {why}")),
    }
}

/// Runs the check for `config` and reports it: the body on stdout and exit 0
/// when healthy, one line on stderr and exit 1 otherwise.
pub fn run(config: &Config) -> i32 {
    match check(config.listen, DEADLINE) {
        Health::Healthy(body) => {
            println!("{}", body.trim_end());
            0
        }
        Health::ListenerOff => {
            println!("guest-agent: the listener is off (listen=off); nothing to check");
            0
        }
        Health::Unhealthy(line) => {
            eprintln!("guest-agent: unhealthy: {line}");
            1
        }
    }
}

/// One request, `Connection: close`; the status and body of the answer.
fn ask(addr: SocketAddr, deadline: Duration) -> Result<(u16, String), String> {
    let target = Target::http(&format!("http://{addr}/health"))?;
    let mut client = Client::tcp(deadline);
    let answer = client
        .request(Method::GET, &target, &[("connection", "close")], None, None)
        .map_err(|e| match e {
            ClientError::Timeout(_) => {
                format!("no answer within {}", humantime::format_duration(deadline))
            }
            ClientError::Io(why) => why,
        })?;
    if !answer.complete {
        return Err(format!(
            "HTTP {}, with a body too long to read",
            answer.status
        ));
    }
    Ok((
        answer.status,
        String::from_utf8_lossy(client.body()).into_owned(),
    ))
}

/// The body squeezed onto one line and cut to a readable length.
fn one_line(body: &str) -> String {
    const MAX: usize = 300;
    let flat: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}…", &flat[..at]),
        None => flat,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::thread::JoinHandle;

    /// A listener on 127.0.0.1:0 that reads one request head and writes
    /// `answer` (or nothing, holding the connection, when `None`).
    fn serve_once(answer: Option<&'static str>) -> (SocketAddr, JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && conn.read(&mut b).unwrap() == 1 {
                head.push(b[0]);
            }
            match answer {
                Some(a) => conn.write_all(a.as_bytes()).unwrap(),
                None => std::thread::sleep(Duration::from_millis(1500)),
            }
            String::from_utf8(head).unwrap()
        });
        (addr, t)
    }

    #[test]
    fn a_200_is_healthy_and_the_request_is_a_plain_get() {
        let body = r#"{"status":"ok"}"#;
        let answer = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\nConnection: keep-alive\r\n\r\n{\"status\":\"ok\"}";
        let (addr, t) = serve_once(Some(answer));
        // Keep-alive on the server side: the framed body ends the wait.
        assert_eq!(
            check(Some(addr), Duration::from_secs(10)),
            Health::Healthy(body.into())
        );
        let head = t.join().unwrap();
        assert!(head.starts_with("GET /health HTTP/1.1\r\n"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n"),
            "{head}"
        );
    }

    #[test]
    fn a_503_is_unhealthy_with_its_body_on_one_line() {
        let body = "{\"status\":\n \"no recent sample\"}\n";
        let answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let (addr, t) = serve_once(Some(answer.leak()));
        let Health::Unhealthy(line) = check(Some(addr), Duration::from_secs(10)) else {
            panic!("a 503 must be unhealthy");
        };
        t.join().unwrap();
        assert_eq!(
            line,
            format!("http://{addr}/health answered 503: {{\"status\": \"no recent sample\"}}")
        );
    }

    #[test]
    fn silence_is_unhealthy_at_the_deadline() {
        let (addr, t) = serve_once(None);
        let Health::Unhealthy(line) = check(Some(addr), Duration::from_millis(300)) else {
            panic!("no answer must be unhealthy");
        };
        assert!(line.contains("no answer within 300ms"), "{line}");
        t.join().unwrap();
    }

    #[test]
    fn nobody_listening_is_unhealthy() {
        // Port 1 (tcpmux) is privileged and unused; unlike a port bound and
        // released, no test running in parallel can be given it.
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let Health::Unhealthy(line) = check(Some(addr), Duration::from_secs(5)) else {
            panic!("a refused connection must be unhealthy");
        };
        assert!(line.contains("connect to 127.0.0.1:1: "), "{line}");
    }

    #[test]
    fn garbage_and_a_cut_answer_are_unhealthy() {
        for answer in [
            "SSH-2.0-OpenSSH\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n{",
        ] {
            let (addr, t) = serve_once(Some(answer));
            let h = check(Some(addr), Duration::from_secs(10));
            assert!(matches!(h, Health::Unhealthy(_)), "{answer:?}: {h:?}");
            t.join().unwrap();
        }
    }

    #[test]
    fn off_and_wildcard_listeners() {
        assert_eq!(check(None, DEADLINE), Health::ListenerOff);
        let t = |s: &str| target(s.parse().unwrap()).to_string();
        assert_eq!(t("0.0.0.0:9000"), "127.0.0.1:9000");
        assert_eq!(t("[::]:81"), "[::1]:81");
        assert_eq!(t("127.0.0.2:8080"), "127.0.0.2:8080");
    }

    #[test]
    fn the_flag_selects_the_action() {
        let args = crate::config::cli::parse(&["--health".to_string()]).unwrap();
        assert_eq!(args.action, crate::config::cli::Action::Health);
        assert!(crate::config::cli::parse(&["--health=1".to_string()]).is_err());
    }
}
