//! Decoding of the TLS keys: what is accepted, what is refused with its
//! YAML path, and that no key material shows in `Debug`.

use super::super::{CheckKind, Config, ConfigError};
use super::*;

/// A self-signed certificate for `name` with its key, in `dir`.
fn files(dir: &Path, stem: &str, name: &str) -> (String, String) {
    let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    let cert = dir.join(format!("{stem}.pem"));
    let key = dir.join(format!("{stem}.key"));
    std::fs::write(&cert, c.cert.pem()).unwrap();
    std::fs::write(&key, c.key_pair.serialize_pem()).unwrap();
    (cert.display().to_string(), key.display().to_string())
}

fn problems(yaml: &str) -> Vec<String> {
    match Config::from_yaml(yaml) {
        Ok(_) => Vec::new(),
        Err(ConfigError::Invalid(p)) => p.iter().map(|p| p.to_string()).collect(),
        Err(e) => vec![e.to_string()],
    }
}

fn has(problems: &[String], want: &str) -> bool {
    problems.iter().any(|p| p.contains(want))
}

#[test]
fn a_terminating_listener_with_routes_decodes() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = files(dir.path(), "www", "www.example.com");
    let yaml = format!(
        "listeners:\n  web:\n    bind: 127.0.0.1:8443\n    \
         tls: {{ certificates: [{{ cert: '{cert}', key: '{key}' }}], alpn: [h2, http/1.1], min_version: 1.3, handshake_timeout: 3s }}\n    \
         routes: [{{ sni: DB.example.com, pool: db }}, {{ sni: '*.example.com', pool: app }}]\n    default_pool: app\n\
         pools:\n  app: {{ backends: ['127.0.0.1:80'] }}\n  db: {{ backends: ['127.0.0.1:5432'] }}\n"
    );
    let c = Config::from_yaml(&yaml).unwrap();
    let l = &c.listeners[0];
    assert_eq!(l.pool, "app", "the default pool is the one waited for");
    let tls = l.tls.as_ref().unwrap();
    assert_eq!(tls.handshake_timeout, Duration::from_secs(3));
    assert_eq!(
        tls.routes[0].sni, "db.example.com",
        "names are compared in lower case"
    );
    assert_eq!(tls.default_pool.as_deref(), Some("app"));
    let TlsMode::Terminate(server) = &tls.mode else {
        panic!("terminate")
    };
    assert_eq!(server.min_version, TlsVersion::Tls13);
    assert_eq!(server.alpn, ["h2", "http/1.1"]);
    assert_eq!(server.certificates[0].names, ["www.example.com"]);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    // The same files decode to an equal configuration; a renewed
    // certificate does not.
    assert_eq!(Config::from_yaml(&yaml).unwrap(), c);
    files(dir.path(), "www", "www.example.com");
    assert_ne!(
        Config::from_yaml(&yaml).unwrap(),
        c,
        "a renewed certificate is a change"
    );
}

#[test]
fn no_key_material_in_debug() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = files(dir.path(), "www", "www.example.com");
    let (ccert, ckey) = files(dir.path(), "client", "client.example.com");
    let yaml = format!(
        "listeners: {{ web: {{ bind: 127.0.0.1:8443, pool: app, tls: {{ cert: '{cert}', key: '{key}' }} }} }}\n\
         pools: {{ app: {{ tls: {{ ca: '{cert}', cert: '{ccert}', key: '{ckey}' }}, backends: ['127.0.0.1:80'] }} }}\n"
    );
    let c = Config::from_yaml(&yaml).unwrap();
    let shown = format!("{c:?}");
    for k in [&key, &ckey] {
        let pem = std::fs::read_to_string(k).unwrap();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(!shown.contains(&body[..40]), "key material in Debug");
    }
    assert!(!shown.contains("PRIVATE"));
    assert!(
        shown.contains("www.key"),
        "the key's file name is shown: {shown}"
    );
    // What HTTP mode hands pingora, and pingora's peer holding it, show no
    // key either (its DER would print as a list of bytes).
    let http = &c.pools[0].tls.as_ref().unwrap().http;
    let der = {
        let pem = std::fs::read_to_string(&ckey).unwrap();
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::PrivateKeyDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .secret_der()
            .to_vec()
    };
    let bytes = |b: &[u8]| {
        b.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut peer = pingora::upstreams::peer::HttpPeer::new("127.0.0.1:1", true, "x".into());
    peer.client_cert_key = http.cert_key.clone();
    // The key shares its algorithm and public part with the certificate,
    // which may show: any run of its bytes the certificate lacks may not.
    let cert_der = bytes(
        &c.pools[0]
            .tls
            .as_ref()
            .unwrap()
            .certificate
            .as_ref()
            .unwrap()
            .key
            .cert[0],
    );
    for shown in [format!("{http:?}"), format!("{peer:?}")] {
        for run in der.windows(12) {
            let run = bytes(run);
            assert!(
                cert_der.contains(&run) || !shown.contains(&run),
                "key in Debug: {shown}"
            );
        }
    }
    assert_eq!(
        format!("{http:?}"),
        "HttpTls { ca_certificates: 1, client_certificate: true }"
    );
    assert!(format!("{peer:?}").contains("client_cert_key: Some"));
    // The same files: the same digest, so kept-alive backend connections
    // survive a reload; a renewed client certificate: another.
    let again = Config::from_yaml(&yaml).unwrap();
    assert_eq!(again.pools[0].tls.as_ref().unwrap().http.id, http.id);
    files(dir.path(), "client", "client.example.com");
    let renewed = Config::from_yaml(&yaml).unwrap();
    assert_ne!(renewed.pools[0].tls.as_ref().unwrap().http.id, http.id);
}

#[test]
fn a_tls_pool_checks_with_a_handshake_unless_told_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, _) = files(dir.path(), "ca", "ca.example.com");
    let yaml = |hc: &str| {
        format!(
            "listeners: {{ web: {{ bind: 127.0.0.1:8443, pool: app }} }}\n\
             pools: {{ app: {{ tls: {{ ca: '{cert}' }}{hc}, backends: ['127.0.0.1:80'] }} }}\n"
        )
    };
    let c = Config::from_yaml(&yaml("")).unwrap();
    assert_eq!(c.pools[0].health_check.kind, CheckKind::Tls);
    assert!(c.pools[0].tls.as_ref().unwrap().verify);
    let c = Config::from_yaml(&yaml(", health_check: { interval: 5s }")).unwrap();
    assert_eq!(c.pools[0].health_check.kind, CheckKind::Tls);
    let c = Config::from_yaml(&yaml(", health_check: { kind: tcp }")).unwrap();
    assert_eq!(c.pools[0].health_check.kind, CheckKind::Tcp);
    let p = problems(
        "listeners: { web: { bind: 127.0.0.1:8443, pool: app } }\n\
         pools: { app: { health_check: { kind: tls }, backends: ['127.0.0.1:80'] } }\n",
    );
    assert!(
        has(
            &p,
            "pools.app.health_check.kind: `tls` handshakes with the backends: the pool needs tls"
        ),
        "{p:?}"
    );
}

#[test]
fn bad_tls_keys_are_refused_with_their_paths() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = files(dir.path(), "www", "www.example.com");
    let tls = format!("{{ cert: '{cert}', key: '{key}' }}");
    let p = problems(&format!(
        "listeners:\n  a: {{ bind: 127.0.0.1:1, routes: [{{ sni: x.example.com, pool: app }}] }}\n  \
         b: {{ bind: 127.0.0.1:2, pool: app, tls: {tls}, routes: [{{ sni: x.example.com, pool: app }}] }}\n  \
         c: {{ bind: 127.0.0.1:3, pool: app, tls: {tls}, default_pool: app }}\n  \
         d: {{ bind: 127.0.0.1:4, tls: {tls}, routes: [{{ sni: 'a.*.com', pool: app }}, {{ sni: y.example.com, pool: app }}, {{ sni: Y.example.com., pool: app }}] }}\n  \
         j: {{ bind: 127.0.0.1:10, tls: {tls}, routes: [{{ sni: y.example.com, pool: nope }}] }}\n  \
         e: {{ bind: 127.0.0.1:5, pool: app, tls: {{ cert: '{cert}', key: '{key}', min_version: 1.1, client_auth: required }} }}\n  \
         f: {{ bind: 127.0.0.1:6, pool: sec, tls: passthrough }}\n  \
         g: {{ bind: 127.0.0.1:7, pool: app, tls: {{ mode: passthrough, alpn: [h2] }} }}\n  \
         h: {{ bind: 127.0.0.1:8, pool: app, tls: terminate }}\n  \
         i: {{ bind: 127.0.0.1:9, pool: app, tls: {{ alpn: [h2] }} }}\n\
         pools:\n  app: {{ backends: ['127.0.0.1:80'] }}\n  \
         sec: {{ tls: {{ ca: '{cert}' }}, backends: ['127.0.0.1:81'] }}\n  \
         off: {{ tls: {{ verify: false }}, backends: ['127.0.0.1:82'] }}\n  \
         both: {{ tls: {{ verify: true, insecure_skip_verify: true }}, backends: ['127.0.0.1:83'] }}\n  \
         named: {{ tls: {{ ca: '{cert}', sni: '*.x.com' }}, backends: ['127.0.0.1:84'] }}\n"
    ));
    for want in [
        "listeners.a.routes: routes choose by the TLS server name: they need tls",
        "listeners.b.pool: with routes, the pool for names no route takes is default_pool",
        "listeners.c.default_pool: only applies with routes",
        "listeners.d.routes[0].sni: `a.*.com` is not a server name or *.name",
        "listeners.j.routes[0].pool: no pool is named `nope`",
        "listeners.d.routes[2].sni: `Y.example.com.` is routed twice",
        "listeners.e.tls.min_version: `1.1` is not a TLS version sluice allows: 1.2 or 1.3",
        "listeners.e.tls.client_auth: needs client_ca",
        "listeners.f.tls: passthrough relays the client's own TLS, but pool sec adds TLS",
        "listeners.g.tls.alpn: does not apply to mode passthrough",
        "listeners.h.tls: must be `passthrough` or a mapping with certificates, found `terminate`",
        "listeners.i.tls.certificates: is required to terminate TLS",
        "pools.off.tls.verify: turning verification off lets anyone on the path read and change the traffic",
        "pools.both.tls.insecure_skip_verify: contradicts verify: true",
        "pools.named.tls.sni: `*.x.com` is not a server name",
    ] {
        assert!(has(&p, want), "missing {want}\n{}", p.join("\n"));
    }
}

#[test]
fn insecure_skip_verify_is_a_warning() {
    let c = Config::from_yaml(
        "listeners: { web: { bind: 127.0.0.1:8443, pool: app } }\n\
         pools: { app: { tls: { insecure_skip_verify: true }, backends: ['127.0.0.1:80'] } }\n",
    )
    .unwrap();
    assert!(!c.pools[0].tls.as_ref().unwrap().verify);
    assert!(
        c.warnings
            .iter()
            .any(|w| w.contains("pools.app.tls: insecure_skip_verify")),
        "{:?}",
        c.warnings
    );
}

#[test]
fn a_client_key_pingora_cannot_sign_with_is_refused_for_http_listeners_only() {
    // A P-521 key: rustls with aws-lc signs with it (TCP mode), ring, which
    // pingora's connector uses in HTTP mode, does not.
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("c.pem"), dir.path().join("c.key"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-521",
            "-nodes",
        ])
        .args(["-days", "30", "-subj", "/CN=client.example.com", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let pool = format!(
        "pools: {{ app: {{ tls: {{ ca: '{c}', cert: '{c}', key: '{k}' }}, backends: ['127.0.0.1:443'] }} }}\n",
        c = cert.display(),
        k = key.display()
    );
    let tcp = format!("listeners: {{ db: {{ bind: 127.0.0.1:8443, pool: app }} }}\n{pool}");
    assert!(problems(&tcp).is_empty(), "{:?}", problems(&tcp));
    let http = format!(
        "listeners: {{ web: {{ bind: 127.0.0.1:8080, pool: app, protocol: http }} }}\n{pool}"
    );
    let p = problems(&http);
    assert!(
        has(
            &p,
            "pools.app.tls: listener web (protocol http): the key of"
        ) && has(&p, "cannot sign for HTTP mode's TLS (ring)"),
        "{p:?}"
    );
}
