//! Test certificates, made at test time with rcgen: a CA and leaves signed
//! by it, written as PEM files into a temporary directory. No key is kept
//! anywhere else.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair, date_time_ymd,
};

/// A CA in a directory of its own.
pub struct Pki {
    dir: tempfile::TempDir,
    ca: Certificate,
    ca_key: KeyPair,
    /// The CA certificate's file.
    pub ca_file: PathBuf,
}

/// A certificate and key written to files.
#[derive(Clone)]
pub struct Leaf {
    /// The PEM chain (the leaf).
    pub cert: PathBuf,
    /// The PEM private key.
    pub key: PathBuf,
}

impl Leaf {
    /// The certificate file as a string for YAML.
    pub fn cert(&self) -> String {
        self.cert.display().to_string()
    }

    /// The key file as a string for YAML.
    pub fn key(&self) -> String {
        self.key.display().to_string()
    }
}

impl Pki {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let ca_key = KeyPair::generate().unwrap();
        let ca = params.self_signed(&ca_key).unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        Pki {
            dir,
            ca,
            ca_key,
            ca_file,
        }
    }

    /// The directory the files are in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA file as a string for YAML.
    pub fn ca(&self) -> String {
        self.ca_file.display().to_string()
    }

    /// A leaf for `names` (the first is also its common name), signed by
    /// the CA, written to `stem.pem` and `stem.key`.
    pub fn leaf(&self, stem: &str, names: &[&str]) -> Leaf {
        self.leaf_with(stem, names, false)
    }

    /// Like [`Pki::leaf`], valid only in 2020 when `expired`.
    pub fn leaf_with(&self, stem: &str, names: &[&str], expired: bool) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, *first);
        }
        if expired {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2020, 12, 31);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let leaf = Leaf {
            cert: self.dir.path().join(format!("{stem}.pem")),
            key: self.dir.path().join(format!("{stem}.key")),
        };
        std::fs::write(&leaf.cert, cert.pem()).unwrap();
        std::fs::write(&leaf.key, key.serialize_pem()).unwrap();
        leaf
    }
}
