//! The kernel command line (`<proc_root>/cmdline`), read as the kernel reads
//! its own parameters: white space separates, double quotes protect spaces,
//! a lone `--` hands the rest to init, and `-` equals `_` in key names.

/// Prefixes that mark a parameter as ours, after `-` → `_` folding.
const PREFIX: &str = "guest_agent.";

/// One `guest_agent.*` parameter found on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    /// The key as written, prefix included (`guest-agent.vm-id`), for messages.
    pub written: String,
    /// The setting name after folding (`vm_id`).
    pub name: String,
    /// The value, quotes removed; `None` when the token had no `=`.
    pub value: Option<String>,
}

/// Splits a command line into tokens: white space outside double quotes
/// separates, quote characters are removed, and tokens after a lone `--`
/// are dropped (they are init's).
pub fn tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_token = false;
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_token = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_token {
                    if cur == "--" {
                        return out;
                    }
                    out.push(std::mem::take(&mut cur));
                    in_token = false;
                }
            }
            c => {
                cur.push(c);
                in_token = true;
            }
        }
    }
    if in_token && cur != "--" {
        out.push(cur);
    }
    out
}

/// The `guest_agent.*` / `guest-agent.*` parameters of a command line, in order.
pub fn params(text: &str) -> Vec<Param> {
    tokens(text)
        .into_iter()
        .filter_map(|tok| {
            let (key, value) = match tok.split_once('=') {
                Some((k, v)) => (k.to_string(), Some(v.to_string())),
                None => (tok.clone(), None),
            };
            let folded = key.replace('-', "_");
            let name = folded.strip_prefix(PREFIX)?.to_string();
            Some(Param {
                written: key,
                name,
                value,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_rules() {
        let cases: &[(&str, &[&str])] = &[
            ("a b\tc\n", &["a", "b", "c"]),
            ("x=\"a b\" y", &["x=a b", "y"]),
            ("\"q=1 2\" z", &["q=1 2", "z"]),
            ("a -- b c", &["a"]),
            ("a --b c", &["a", "--b", "c"]),
            ("a x=\"unterminated b", &["a", "x=unterminated b"]),
            ("", &[]),
            ("  --", &[]),
        ];
        for (input, want) in cases {
            assert_eq!(tokens(input), *want, "{input:?}");
        }
    }

    #[test]
    fn both_prefixes_and_dash_underscore_equivalence() {
        let p = params(
            "console=ttyS0 guest_agent.vm_id=\"vm a\" guest-agent.interval=1s guest_agent.vm-id=b \
             guest-agent.proc-root=/x guest_agentx.url=no guest_agent.flag -- guest_agent.url=init",
        );
        let got: Vec<(&str, Option<&str>)> = p
            .iter()
            .map(|p| (p.name.as_str(), p.value.as_deref()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("vm_id", Some("vm a")),
                ("interval", Some("1s")),
                ("vm_id", Some("b")),
                ("proc_root", Some("/x")),
                ("flag", None),
            ]
        );
        assert_eq!(p[1].written, "guest-agent.interval");
    }
}
