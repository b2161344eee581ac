//! Reading the three signed-request headers as RFC 9651 structured fields
//! (with the `sfv` crate): what the ingest kit needs of `Signature-Input`,
//! `Signature` and `Content-Digest`, each refusal worded for the agent's
//! log and `/health` (docs/security.md#verification).

use sfv::{BareItem, Dictionary, FieldType, Item, ListEntry, Parser};

use super::{ALG, COMPONENTS, LABEL};

/// The signature's declaration under [`LABEL`], as read from
/// `Signature-Input`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// The covered components, in the order listed.
    pub components: Vec<String>,
    /// `created`, unix seconds.
    pub created: i64,
    /// `keyid`, `KID/VM_ID`.
    pub keyid: String,
    /// The inner list re-serialized: the `@signature-params` value of the
    /// signature base.
    pub params: String,
}

fn dictionary(name: &str, value: &str) -> Result<Dictionary, String> {
    Parser::new(value)
        .parse::<Dictionary>()
        .map_err(|e| format!("{name}: not a structured-field dictionary ({e})"))
}

/// Reads `Signature-Input`: the entry [`LABEL`] must list exactly
/// [`COMPONENTS`] (in any order) and carry `created`, `keyid` and
/// `alg="hmac-sha256"`. Entries under other labels are ignored.
pub fn signature_input(value: &str) -> Result<Input, String> {
    let dict = dictionary("Signature-Input", value)?;
    let Some(entry) = dict.get(LABEL) else {
        return Err(format!("Signature-Input: no signature labelled {LABEL}"));
    };
    let ListEntry::InnerList(list) = entry else {
        return Err(format!(
            "Signature-Input: {LABEL} is not a list of components"
        ));
    };
    let mut components = Vec::with_capacity(list.items.len());
    for item in &list.items {
        match (&item.bare_item, item.params.is_empty()) {
            (BareItem::String(s), true) => components.push(s.as_str().to_string()),
            _ => {
                return Err(format!(
                    "Signature-Input: {LABEL} lists a component that is not a plain string"
                ));
            }
        }
    }
    let mut sorted: Vec<&str> = components.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    let mut expected = COMPONENTS;
    expected.sort_unstable();
    if sorted != expected {
        return Err(format!(
            "Signature-Input: {LABEL} covers {components:?}; expected \"@method\" \"@path\" \"content-digest\""
        ));
    }
    let param = |name: &str| list.params.get(name);
    let created = match param("created") {
        Some(BareItem::Integer(i)) => i64::from(*i),
        Some(_) => return Err("Signature-Input: created is not an integer".into()),
        None => return Err("Signature-Input: no created parameter".into()),
    };
    let keyid = match param("keyid") {
        Some(BareItem::String(s)) => s.as_str().to_string(),
        Some(_) => return Err("Signature-Input: keyid is not a string".into()),
        None => return Err("Signature-Input: no keyid parameter".into()),
    };
    match param("alg") {
        Some(BareItem::String(s)) if s.as_str() == ALG => {}
        Some(_) => return Err(format!("Signature-Input: alg is not \"{ALG}\"")),
        None => return Err(format!("Signature-Input: no alg parameter (\"{ALG}\")")),
    }
    // The signature base's last line is the inner list as serialized; a
    // one-entry dictionary serializes it after "LABEL=".
    let mut one = Dictionary::new();
    one.insert(
        sfv::KeyRef::from_str(LABEL)
            .map_err(|e| format!("label: {e}"))?
            .to_owned(),
        entry.clone(),
    );
    let text = one
        .serialize()
        .ok_or("Signature-Input: cannot be serialized again")?;
    let params = text
        .strip_prefix(&format!("{LABEL}="))
        .ok_or("Signature-Input: cannot be serialized again")?
        .to_string();
    Ok(Input {
        components,
        created,
        keyid,
        params,
    })
}

/// Reads `Signature`: the byte sequence under [`LABEL`].
pub fn signature(value: &str) -> Result<Vec<u8>, String> {
    let dict = dictionary("Signature", value)?;
    match dict.get(LABEL) {
        Some(ListEntry::Item(Item {
            bare_item: BareItem::ByteSequence(b),
            ..
        })) => Ok(b.clone()),
        Some(_) => Err(format!("Signature: {LABEL} is not a byte sequence")),
        None => Err(format!("Signature: no signature labelled {LABEL}")),
    }
}

/// Reads `Content-Digest`: the `sha-256` byte sequence (other algorithms
/// are ignored, as RFC 9530 allows).
pub fn content_digest(value: &str) -> Result<Vec<u8>, String> {
    let dict = dictionary("Content-Digest", value)?;
    match dict.get("sha-256") {
        Some(ListEntry::Item(Item {
            bare_item: BareItem::ByteSequence(b),
            ..
        })) => Ok(b.clone()),
        Some(_) => Err("Content-Digest: sha-256 is not a byte sequence".into()),
        None => Err("Content-Digest: no sha-256 digest".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_input_reads_back_to_itself() {
        let v = "ga=(\"@method\" \"@path\" \"content-digest\");created=1700000000;\
                 keyid=\"k1/vm-1\";alg=\"hmac-sha256\"";
        let input = signature_input(&format!("other=(\"@method\");created=1, {v}")).unwrap();
        assert_eq!(input.created, 1_700_000_000);
        assert_eq!(input.keyid, "k1/vm-1");
        assert_eq!(input.params, &v[3..]);
        assert_eq!(input.components, COMPONENTS);
    }

    #[test]
    fn other_orders_are_kept_for_the_base() {
        let v = "ga=(\"content-digest\" \"@path\" \"@method\");alg=\"hmac-sha256\";keyid=\"k/v\";created=5";
        let input = signature_input(v).unwrap();
        assert_eq!(input.params, &v[3..]);
        assert_eq!(input.components[0], "content-digest");
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let cases = [
            ("", "no signature labelled ga"),
            ("ga=(", "not a structured-field dictionary"),
            ("ga=1", "not a list of components"),
            (
                "ga=(\"@method\" \"@path\");created=1;keyid=\"k/v\";alg=\"hmac-sha256\"",
                "expected",
            ),
            (
                "ga=(\"@method\" \"@path\" \"content-digest\" \"@authority\");created=1;keyid=\"k/v\";alg=\"hmac-sha256\"",
                "expected",
            ),
            (
                "ga=(\"@method\" \"@path\" \"content-digest\");keyid=\"k/v\";alg=\"hmac-sha256\"",
                "no created",
            ),
            (
                "ga=(\"@method\" \"@path\" \"content-digest\");created=1;alg=\"hmac-sha256\"",
                "no keyid",
            ),
            (
                "ga=(\"@method\" \"@path\" \"content-digest\");created=1;keyid=\"k/v\";alg=\"rsa-pss-sha512\"",
                "alg",
            ),
            (
                "ga=(\"@method\";x \"@path\" \"content-digest\");created=1;keyid=\"k/v\";alg=\"hmac-sha256\"",
                "not a plain string",
            ),
        ];
        for (v, why) in cases {
            let e = signature_input(v).unwrap_err();
            assert!(e.contains(why), "{v}: {e}");
        }
        assert_eq!(signature("ga=:AAEC:").unwrap(), vec![0, 1, 2]);
        assert!(signature("ga=\"x\"").unwrap_err().contains("byte sequence"));
        assert!(
            signature("sig=:AA==:")
                .unwrap_err()
                .contains("no signature")
        );
        assert_eq!(
            content_digest("sha-512=:AA==:, sha-256=:AQ==:").unwrap(),
            vec![1]
        );
        assert!(
            content_digest("sha-512=:AA==:")
                .unwrap_err()
                .contains("sha-256")
        );
    }
}
