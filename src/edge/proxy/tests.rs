//! The PROXY header reader: known headers, what the spec rejects, and a
//! property test over random and mutated headers split at every byte
//! boundary, on real sockets.

use super::*;
use proptest::prelude::*;
use tokio::io::AsyncWriteExt;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn both_versions_round_trip_and_local_means_the_connection_itself() {
    let (c, l) = (addr("192.0.2.10:40000"), addr("198.51.100.1:443"));
    for v in [ProxyVersion::V1, ProxyVersion::V2] {
        let h = header(v, c, l);
        let got = parse(&h, None).unwrap().unwrap();
        assert_eq!(got.addresses, Some((c, l)), "{v:?}");
        assert_eq!(got.len, h.len());
        assert_eq!(parse(&h, Some(v)).unwrap().unwrap().len, h.len());
        let local = check_header(v);
        assert_eq!(parse(&local, None).unwrap().unwrap().addresses, None);
    }
    let (c6, l6) = (addr("[2001:db8::1]:1234"), addr("[2001:db8::2]:80"));
    for v in [ProxyVersion::V1, ProxyVersion::V2] {
        let got = parse(&header(v, c6, l6), None).unwrap().unwrap();
        assert_eq!(got.addresses, Some((c6, l6)));
    }
    // Mixed families: the IPv4 side is IPv4-mapped.
    let got = parse(&header(ProxyVersion::V2, c, l6), None)
        .unwrap()
        .unwrap();
    let (src, _) = got.addresses.unwrap();
    assert_eq!(src.ip().to_canonical(), c.ip());
}

#[test]
fn what_the_spec_rejects_is_refused() {
    let v1 = header(ProxyVersion::V1, addr("10.0.0.1:1"), addr("10.0.0.2:2"));
    assert!(matches!(
        parse(&v1, Some(ProxyVersion::V2)),
        Err(HeaderError::WrongVersion("v1", "v2"))
    ));
    for bad in [
        &b"PROXY TCP4 10.0.0.1 10.0.0.2 1\r\n"[..],
        b"PROXY TCP4 300.0.0.1 10.0.0.2 1 2\r\n",
        b"PROXY TCP5 10.0.0.1 10.0.0.2 1 2\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\n",
    ] {
        assert!(
            parse(bad, None).is_err(),
            "{:?} must be refused",
            String::from_utf8_lossy(bad)
        );
    }
    // Still incomplete: wait for more.
    assert_eq!(parse(b"PROXY TCP4 10.0", None), Ok(None));
    assert_eq!(parse(&V2_SIGNATURE[..5], None), Ok(None));
    // A v2 header announcing more than the bound.
    let mut long = V2_SIGNATURE.to_vec();
    long.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
    long.resize(MAX_HEADER, 0);
    assert_eq!(parse(&long, None), Err(HeaderError::TooLong));
    assert!(looks_like_header(b"PROXY TCP4"));
    assert!(looks_like_header(&V2_SIGNATURE[..8]));
    assert!(!looks_like_header(b"GET / HTTP/1.1"));
}

/// A registered socket pair: the test writes to `a`, [`read`] reads `b`.
async fn pair() -> (tokio::net::TcpStream, Socket) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = tokio::net::TcpStream::connect(l.local_addr().unwrap())
        .await
        .unwrap();
    let (b, _) = l.accept().await.unwrap();
    let b = crate::relay::socket::register(b.into_std().unwrap()).unwrap();
    (a, b)
}

/// Bytes of a header (valid, or mutated), as proptest draws them.
fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    let valid = (any::<bool>(), any::<[u8; 4]>(), any::<u16>(), any::<bool>()).prop_map(
        |(v2, ip, port, six)| {
            let c = if six {
                SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::from([ip[0]; 16])), port)
            } else {
                SocketAddr::new(IpAddr::V4(ip.into()), port)
            };
            let v = if v2 {
                ProxyVersion::V2
            } else {
                ProxyVersion::V1
            };
            header(v, c, addr("127.0.0.1:80"))
        },
    );
    prop_oneof![
        valid.clone(),
        (valid, any::<usize>(), any::<u8>()).prop_map(|(mut h, at, b)| {
            let i = at % h.len();
            h[i] = b;
            h
        }),
        prop::collection::vec(any::<u8>(), 0..200),
        prop::collection::vec(any::<u8>(), 0..40).prop_map(|tail| {
            let mut h = V2_SIGNATURE.to_vec();
            h.extend(tail);
            h
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("SLUICE_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(300)
    ))]

    /// Whatever arrives, split wherever: never a panic, never more taken
    /// than the header (the payload after it stays), the same verdict as
    /// parsing the bytes at once.
    #[test]
    fn any_header_split_anywhere_is_judged_alike(
        bytes in header_bytes(),
        split in any::<usize>(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let at_once = parse(&bytes, None);
            let (mut a, b) = pair().await;
            let cut = split % (bytes.len() + 1);
            let payload = b"PAYLOAD";
            let writer = {
                let bytes = bytes.clone();
                tokio::spawn(async move {
                    a.write_all(&bytes[..cut]).await.unwrap();
                    a.flush().await.unwrap();
                    tokio::task::yield_now().await;
                    a.write_all(&bytes[cut..]).await.unwrap();
                    a.write_all(payload).await.unwrap();
                    a.shutdown().await.unwrap();
                    a
                })
            };
            let got = tokio::time::timeout(std::time::Duration::from_secs(10), read(&b, None))
                .await
                .expect("bounded in time");
            let _a = writer.await.unwrap();
            match (&at_once, &got) {
                (Ok(Some(want)), Ok(have)) => {
                    prop_assert_eq!(want, have);
                    // The rest is still there, untouched.
                    let mut rest = Vec::new();
                    let mut std_b = b.into_inner();
                    std_b.set_nonblocking(false).unwrap();
                    std::io::Read::read_to_end(&mut std_b, &mut rest).unwrap();
                    let mut expect = bytes[want.len..].to_vec();
                    expect.extend_from_slice(payload);
                    prop_assert_eq!(rest, expect);
                }
                (Err(_), Err(_)) => {}
                // Incomplete at once: the payload completed or broke it.
                (Ok(None), _) => {}
                other => prop_assert!(false, "at once {:?}, streamed {:?}", other.0, other.1),
            }
            Ok(())
        })?;
    }
}
