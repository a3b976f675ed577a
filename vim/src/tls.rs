//! vimd's TLS: a private certificate authority made at first start, and the certificate it issues
//! for vimd's own endpoints (the API and the embedded NATS server). Agents and vimctl trust that CA
//! (`host add` hands it out); an operator may give the API a certificate of their own instead.
//!
//! Files, under `STATE_DIR/tls` (0700): `ca.pem` (public), `ca.key`, `server.pem`, `server.key`
//! (0600). The CA lives ten years; the server certificate is issued anew at every start for the
//! names vimd is reached by, so a new `--tls-name` or advertised address needs only a restart.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// Where vimd keeps its CA and server certificate.
#[derive(Debug, Clone)]
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    /// Makes the CA if there is none yet, and issues the server certificate for `names` (DNS
    /// names or IP addresses; `localhost` and the loopback addresses are always included).
    pub fn init(state_dir: &Path, names: &[String]) -> Result<Pki> {
        let pki = Pki {
            dir: state_dir.join("tls"),
        };
        crate::files::private_dir(&pki.dir)?;
        if !pki.ca_cert().exists() || !pki.ca_key().exists() {
            let key = KeyPair::generate()?;
            let cert = ca_params().self_signed(&key)?;
            crate::files::replace_private(&pki.ca_key(), key.serialize_pem().as_bytes())?;
            write_public(&pki.ca_cert(), cert.pem().as_bytes())?;
            tracing::info!(path = %pki.ca_cert().display(), "made vimd's certificate authority");
        }
        let ca_key = std::fs::read_to_string(pki.ca_key())
            .with_context(|| format!("cannot read {}", pki.ca_key().display()))?;
        let ca_pem = std::fs::read_to_string(pki.ca_cert())
            .with_context(|| format!("cannot read {}", pki.ca_cert().display()))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, KeyPair::from_pem(&ca_key)?)
            .with_context(|| format!("{} is not a CA certificate", pki.ca_cert().display()))?;

        // The key is kept across starts (the certificate is issued anew for today's names), so a
        // join command's pin of it (`spki_pin`) holds while vimd restarts.
        let key = match std::fs::read_to_string(pki.server_key()) {
            Ok(pem) => KeyPair::from_pem(&pem)
                .with_context(|| format!("{} is not a private key", pki.server_key().display()))?,
            Err(_) => {
                let key = KeyPair::generate()?;
                crate::files::replace_private(&pki.server_key(), key.serialize_pem().as_bytes())?;
                key
            }
        };
        let cert = server_params(names)?.signed_by(&key, &issuer)?;
        write_public(&pki.server_cert(), cert.pem().as_bytes())?;
        Ok(pki)
    }
}

/// A certificate is public: readable by anyone who can reach the (0700) directory it is in.
fn write_public(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    crate::files::replace_private(path, bytes)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "vimd private CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(3650);
    p
}

fn server_params(names: &[String]) -> Result<CertificateParams> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "vimd");
    p.distinguished_name = dn;
    let mut all: Vec<String> = ["localhost", "127.0.0.1", "::1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for n in names {
        if !n.is_empty() && !all.contains(n) {
            all.push(n.clone());
        }
    }
    for n in &all {
        p.subject_alt_names.push(match n.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => {
                let dns_like = n.len() <= 253
                    && n.split('.').all(|l| {
                        !l.is_empty()
                            && l.len() <= 63
                            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    });
                anyhow::ensure!(dns_like, "{n:?} is not a DNS name or an IP address");
                SanType::DnsName(n.as_str().try_into()?)
            }
        });
    }
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(825);
    Ok(p)
}

/// The host part of a URL or `host:port` (`nats://a:4222` → `a`), for the certificate's names;
/// none for a wildcard address.
/// Debian's trusted roots (ca-certificates): for servers a public CA certified (a vimd behind
/// one, for vimctl; a webhook's receiver, for vimd).
pub fn system_roots() -> Vec<reqwest::Certificate> {
    std::fs::read("/etc/ssl/certs/ca-certificates.crt")
        .ok()
        .and_then(|pem| reqwest::Certificate::from_pem_bundle(&pem).ok())
        .unwrap_or_default()
}

pub fn host_of(addr: &str) -> Option<String> {
    let rest = addr.split("://").last().unwrap_or(addr);
    let hostport = rest.split('/').next().unwrap_or(rest);
    let host = if let Some(v6) = hostport.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        hostport.rsplit_once(':').map_or(hostport, |(h, _)| h)
    };
    match host {
        "" | "0.0.0.0" | "::" => None,
        h => Some(h.to_string()),
    }
}

/// The pin of the first certificate in a PEM file, as curl's `--pinnedpubkey` takes it:
/// `sha256//` and the base64 of the SHA-256 of its SubjectPublicKeyInfo.
pub fn spki_pin(cert: &Path) -> Result<String> {
    use base64::Engine;
    use sha2::Digest;
    let pem = std::fs::read(cert).with_context(|| format!("cannot read {}", cert.display()))?;
    let der = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .with_context(|| format!("{}: no certificate in it", cert.display()))?
        .with_context(|| format!("{}: not a PEM certificate", cert.display()))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| anyhow::anyhow!("{}: {e}", cert.display()))?;
    let digest = sha2::Sha256::digest(parsed.public_key().raw);
    Ok(format!(
        "sha256//{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    ))
}

/// A rustls server configuration from PEM files (HTTP/1.1 only, as the API serves).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert).with_context(|| format!("cannot open {}", cert.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("{}: not a PEM certificate chain", cert.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{}: no certificate in it",
        cert.display()
    );
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key).with_context(|| format!("cannot open {}", key.display()))?,
    ))
    .with_context(|| format!("{}: not a PEM private key", key.display()))?
    .with_context(|| format!("{}: no private key in it", key.display()))?;
    let mut c = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("the certificate and key do not go together")?;
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_urls_and_addresses() {
        assert_eq!(host_of("nats://10.0.0.1:4222").as_deref(), Some("10.0.0.1"));
        assert_eq!(
            host_of("tls://vim.example:4222").as_deref(),
            Some("vim.example")
        );
        assert_eq!(host_of("127.0.0.1:8640").as_deref(), Some("127.0.0.1"));
        assert_eq!(host_of("[::1]:8640").as_deref(), Some("::1"));
        assert_eq!(host_of("0.0.0.0:4222"), None);
        assert_eq!(host_of("vim"), Some("vim".into()));
    }

    #[test]
    fn the_ca_is_kept_and_the_server_certificate_issued_anew() {
        let dir = tempfile::tempdir().unwrap();
        let p = Pki::init(dir.path(), &["vim.example".into(), "10.1.2.3".into()]).unwrap();
        let ca1 = std::fs::read(p.ca_cert()).unwrap();
        let s1 = std::fs::read(p.server_cert()).unwrap();
        server_config(&p.server_cert(), &p.server_key()).unwrap();
        let pin = spki_pin(&p.server_cert()).unwrap();
        assert!(pin.starts_with("sha256//") && pin.len() == 8 + 44, "{pin}");
        let p = Pki::init(dir.path(), &[]).unwrap();
        // A new certificate for the same key: the pin holds.
        assert_eq!(spki_pin(&p.server_cert()).unwrap(), pin);
        assert!(spki_pin(&p.ca_cert()).unwrap() != pin);
        assert_eq!(
            std::fs::read(p.ca_cert()).unwrap(),
            ca1,
            "the CA must survive restarts"
        );
        assert_ne!(std::fs::read(p.server_cert()).unwrap(), s1);
        use std::os::unix::fs::PermissionsExt;
        let mode = |f: PathBuf| std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(p.dir.join("ca.key")), 0o600);
        assert_eq!(mode(p.server_key()), 0o600);
        assert_eq!(mode(p.dir.clone()), 0o700);
        assert!(Pki::init(dir.path(), &["not a name!".into()]).is_err());
    }
}
