//! What a TLS peer's certificate says about it: its subject alternative names by type,
//! subject, serial and validity. SAN matchers, RBAC's `authenticated` principal, access-log
//! operators (`%DOWNSTREAM_PEER_URI_SAN%`, ...) and `/certs` all read this one parse. A
//! downstream connection's certificate is parsed when something first asks (most connections
//! are never asked: a resumed handshake skips the verifier, and a chain without RBAC or peer
//! log fields reads nothing), not in the accept path.

use std::net::IpAddr;
use std::sync::OnceLock;

use rustls::pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate, X509Name};

/// One certificate, and its names and facts once read.
#[derive(Debug)]
pub struct PeerCertificate {
    der: CertificateDer<'static>,
    facts: OnceLock<Facts>,
}

/// What [`PeerCertificate`]'s accessors return, read from the DER.
#[derive(Debug, Default)]
struct Facts {
    subject: String,
    issuer: String,
    uri_sans: Vec<String>,
    dns_sans: Vec<String>,
    ip_sans: Vec<String>,
    email_sans: Vec<String>,
    /// `otherName` SANs: the type's OID (dotted) and the value as a string, as Envoy reads it.
    other_names: Vec<(String, String)>,
    serial: String,
    not_before: i64,
    not_after: i64,
}

impl PeerCertificate {
    /// Reads a DER certificate now; `None` if it is not one.
    pub fn parse(der: &[u8]) -> Option<PeerCertificate> {
        let facts = Facts::read(der)?;
        Some(PeerCertificate {
            der: CertificateDer::from(der.to_vec()),
            facts: OnceLock::from(facts),
        })
    }

    /// Keeps a certificate rustls has already checked, to read when first asked. (One that
    /// does not parse reads as having no names.)
    pub fn lazy(der: CertificateDer<'static>) -> PeerCertificate {
        PeerCertificate {
            der,
            facts: OnceLock::new(),
        }
    }

    fn facts(&self) -> &Facts {
        self.facts
            .get_or_init(|| Facts::read(&self.der).unwrap_or_default())
    }

    /// The subject as RFC 2253 prints it (last RDN first), as Envoy prints it.
    pub fn subject(&self) -> &str {
        &self.facts().subject
    }

    /// The issuer, printed as the subject is.
    pub fn issuer(&self) -> &str {
        &self.facts().issuer
    }

    pub fn uri_sans(&self) -> &[String] {
        &self.facts().uri_sans
    }

    pub fn dns_sans(&self) -> &[String] {
        &self.facts().dns_sans
    }

    /// IP SANs in their text form (`10.0.0.1`, `::1`).
    pub fn ip_sans(&self) -> &[String] {
        &self.facts().ip_sans
    }

    pub fn email_sans(&self) -> &[String] {
        &self.facts().email_sans
    }

    /// `otherName` SANs: (type OID in dotted form, value).
    pub fn other_names(&self) -> &[(String, String)] {
        &self.facts().other_names
    }

    /// The serial number in lowercase hex, as Envoy prints it.
    pub fn serial(&self) -> &str {
        &self.facts().serial
    }

    /// Validity start and end, in seconds since the Unix epoch.
    pub fn validity(&self) -> (i64, i64) {
        (self.facts().not_before, self.facts().not_after)
    }
}

impl Facts {
    fn read(der: &[u8]) -> Option<Facts> {
        let (_, certificate) = X509Certificate::from_der(der).ok()?;
        let mut peer = Facts {
            subject: rfc2253(certificate.subject()),
            issuer: rfc2253(certificate.issuer()),
            serial: serial_hex(certificate.raw_serial()),
            not_before: certificate.validity().not_before.timestamp(),
            not_after: certificate.validity().not_after.timestamp(),
            ..Facts::default()
        };
        if let Ok(Some(names)) = certificate.subject_alternative_name() {
            for name in &names.value.general_names {
                match name {
                    GeneralName::URI(uri) => peer.uri_sans.push((*uri).to_string()),
                    GeneralName::DNSName(dns) => peer.dns_sans.push((*dns).to_string()),
                    GeneralName::RFC822Name(email) => peer.email_sans.push((*email).to_string()),
                    GeneralName::IPAddress(bytes) => {
                        if let Some(ip) = ip_address(bytes) {
                            peer.ip_sans.push(ip.to_string());
                        }
                    }
                    GeneralName::OtherName(oid, value) => {
                        peer.other_names
                            .push((oid.to_id_string(), other_name_value(value)));
                    }
                    _ => {}
                }
            }
        }
        Some(peer)
    }
}

/// A serial number in lowercase hex without leading zero bytes (DER adds one to keep a
/// number positive), as OpenSSL prints it for Envoy.
fn serial_hex(raw: &[u8]) -> String {
    let start = raw
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    raw[start..]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// An `otherName` value (`[0] EXPLICIT ANY`) as the string Envoy matches (its
/// `Utility::generalNameAsString`): a string type's bytes, a number in decimal, a boolean as
/// `true` or `false`, an OID in dotted form, a BMP or universal string in UTF-8, a set or
/// sequence as its whole DER; any other type, or a value that does not read, as "".
fn other_name_value(explicit: &[u8]) -> String {
    use x509_parser::asn1_rs::{Any, Class, FromDer, Oid, Tag};
    use x509_parser::num_bigint::BigInt;
    let Ok((_, wrapper)) = Any::from_der(explicit) else {
        return String::new();
    };
    let Ok((rest, value)) = Any::from_der(wrapper.data) else {
        return String::new();
    };
    let element = &wrapper.data[..wrapper.data.len() - rest.len()];
    if value.header.class() != Class::Universal {
        return String::new();
    }
    let data = value.data;
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    let units = |width: usize| -> String {
        let code = |chunk: &[u8]| {
            chunk
                .iter()
                .fold(0u32, |code, b| (code << 8) | u32::from(*b))
        };
        if width == 2 {
            let units: Vec<u16> = data.chunks(2).map(|c| code(c) as u16).collect();
            String::from_utf16_lossy(&units)
        } else {
            data.chunks(4)
                .map(|c| char::from_u32(code(c)).unwrap_or(char::REPLACEMENT_CHARACTER))
                .collect()
        }
    };
    match value.tag() {
        Tag::Boolean => (if data.first().is_some_and(|b| *b != 0) {
            "true"
        } else {
            "false"
        })
        .to_string(),
        Tag::Integer | Tag::Enumerated => BigInt::from_signed_bytes_be(data).to_string(),
        Tag::Oid => Oid::new(data.into()).to_id_string(),
        Tag::BitString => text(data.get(1..).unwrap_or_default()),
        Tag::OctetString
        | Tag::PrintableString
        | Tag::T61String
        | Tag::Ia5String
        | Tag::GeneralString
        | Tag::UtcTime
        | Tag::GeneralizedTime
        | Tag::VisibleString
        | Tag::Utf8String => text(data),
        Tag::BmpString => units(2),
        Tag::UniversalString => units(4),
        // The whole element, tag and length too.
        Tag::Sequence | Tag::Set => text(element),
        _ => String::new(),
    }
}

fn ip_address(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

/// A distinguished name as RFC 2253 (and OpenSSL's `XN_FLAG_RFC2253`) prints it: the RDNs in
/// reverse order, joined by `,`; attributes of one RDN joined by `+`; special characters
/// escaped.
fn rfc2253(name: &X509Name<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    let mut out = String::new();
    for (index, rdn) in name
        .iter_rdn()
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .enumerate()
    {
        if index > 0 {
            out.push(',');
        }
        for (position, attribute) in rdn.iter().enumerate() {
            if position > 0 {
                out.push('+');
            }
            let oid = attribute.attr_type();
            match x509_parser::objects::oid2abbrev(oid, registry) {
                Ok(short) => out.push_str(short),
                Err(_) => out.push_str(&oid.to_id_string()),
            }
            out.push('=');
            match attribute.as_str() {
                Ok(value) => escape_into(&mut out, value),
                // A value that is not a string prints as `#` and its DER in hex.
                Err(_) => {
                    out.push('#');
                    for byte in attribute.attr_value().data.iter() {
                        out.push_str(&format!("{byte:02X}"));
                    }
                }
            }
        }
    }
    out
}

fn escape_into(out: &mut String, value: &str) {
    let last = value.chars().count().saturating_sub(1);
    for (index, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (index == 0 && (c == '#' || c == ' '))
            || (index == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

    #[test]
    fn sans_and_subject_read_as_envoy_prints_them() {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![
            SanType::URI("spiffe://cluster.local/ns/a/sa/b".try_into().unwrap()),
            SanType::DnsName("b.a.svc".try_into().unwrap()),
            SanType::IpAddress("10.1.2.3".parse().unwrap()),
            SanType::Rfc822Name("ops@example.com".try_into().unwrap()),
        ];
        let mut name = DistinguishedName::new();
        name.push(DnType::CountryName, "US");
        name.push(DnType::OrganizationName, "Acme, Inc");
        name.push(DnType::CommonName, "client");
        params.distinguished_name = name;
        params.serial_number = Some(vec![0x0a, 0xbc].into());
        let certificate = params.self_signed(&KeyPair::generate().unwrap()).unwrap();
        let peer = PeerCertificate::parse(certificate.der()).unwrap();
        assert_eq!(peer.uri_sans(), ["spiffe://cluster.local/ns/a/sa/b"]);
        assert_eq!(peer.dns_sans(), ["b.a.svc"]);
        assert_eq!(peer.ip_sans(), ["10.1.2.3"]);
        assert_eq!(peer.email_sans(), ["ops@example.com"]);
        assert_eq!(peer.subject(), r"CN=client,O=Acme\, Inc,C=US");
        assert_eq!(peer.issuer(), peer.subject());
        assert_eq!(peer.serial(), "0abc");
        let (start, end) = peer.validity();
        assert!(start < end);
        assert!(PeerCertificate::parse(b"not a certificate").is_none());
        let lazy = PeerCertificate::lazy(certificate.der().clone());
        assert_eq!(lazy.uri_sans(), peer.uri_sans());
        assert_eq!(lazy.subject(), peer.subject());
        let garbage = PeerCertificate::lazy(CertificateDer::from(b"not a certificate".to_vec()));
        assert!(garbage.uri_sans().is_empty());
    }

    /// The strings Envoy 1.40 matched OTHER_NAME matchers against, for values of each kind
    /// (checked by hand against Envoy with certificates carrying them).
    #[test]
    fn other_name_values_read_as_envoy_reads_them() {
        // `[0] EXPLICIT` around one DER element.
        let explicit = |tag: u8, content: &[u8]| {
            let mut element = vec![tag, content.len() as u8];
            element.extend_from_slice(content);
            let mut wrapped = vec![0xa0, element.len() as u8];
            wrapped.extend(element);
            wrapped
        };
        let big = 1_234_567_890_123_456_789_012_345u128.to_be_bytes();
        let big = &big[big.iter().position(|b| *b != 0).unwrap()..];
        let bmp: Vec<u8> = "héllo".encode_utf16().flat_map(u16::to_be_bytes).collect();
        let cases: [(u8, &[u8], &str); 8] = [
            (0x0c, b"user@example.com", "user@example.com"),
            (0x16, b"hello", "hello"),
            (0x02, big, "1234567890123456789012345"),
            (0x02, &[0xff], "-1"),
            (0x01, &[0xff], "true"),
            (0x1e, &bmp, "héllo"),
            (0x30, &[0x0c, 0x03, b'a', b'b', b'c'], "0\x05\x0c\x03abc"),
            (0x05, &[], ""),
        ];
        for (tag, content, want) in cases {
            assert_eq!(other_name_value(&explicit(tag, content)), want, "tag {tag}");
        }
        assert_eq!(other_name_value(b"\xa0"), "", "a value that does not read");

        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::OtherName((
            vec![1, 3, 6, 1, 4, 1, 311, 20, 2, 3],
            "user@example.com".into(),
        ))];
        let certificate = params.self_signed(&KeyPair::generate().unwrap()).unwrap();
        let peer = PeerCertificate::parse(certificate.der()).unwrap();
        assert_eq!(
            peer.other_names(),
            [(
                "1.3.6.1.4.1.311.20.2.3".to_string(),
                "user@example.com".to_string()
            )]
        );
    }
}
