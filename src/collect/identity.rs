//! The guest's identity: hostname, boot id, and a fresh run id per process.

/// The first line of a one-line /proc file such as `sys/kernel/hostname`,
/// without its newline; an empty file is an error.
pub fn parse_line(text: &[u8]) -> Result<String, procfs::ProcError> {
    let text = std::str::from_utf8(text).map_err(|e| procfs::ProcError::Other(e.to_string()))?;
    let line = text.lines().next().unwrap_or("").trim();
    if line.is_empty() {
        return Err(procfs::ProcError::Other("empty".into()));
    }
    Ok(line.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn first_line_trimmed() {
        assert_eq!(super::parse_line(b"vm-17\n").unwrap(), "vm-17");
        assert!(super::parse_line(b"\n").is_err());
    }
}
