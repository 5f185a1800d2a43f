//! Who may connect and how often, decided by hand-made clocks and addresses.

use super::*;
use proptest::prelude::*;
use std::time::Duration;

/// A client's address, or None for "unix".
fn ip(s: &str) -> Option<IpAddr> {
    (s != "unix").then(|| s.parse().unwrap())
}

fn cidr(s: &str) -> Cidr {
    s.parse().unwrap()
}

fn rules(set: impl FnOnce(&mut Rules)) -> Rules {
    let mut rules = Rules::default();
    set(&mut rules);
    rules
}

/// A new service under `r`, and a function that decides for a client `ms`
/// milliseconds in, drops its guard, and says "ok" or the refusal's word.
fn service(
    r: &Rules,
) -> (
    Arc<Admission>,
    Instant,
    impl Fn(u64, &str) -> &'static str + '_,
) {
    let (a, t0) = (Admission::new(), Instant::now());
    let admission = Arc::clone(&a);
    let try_at = move |ms, client: &str| {
        let now = t0 + Duration::from_millis(ms);
        admission
            .admit(ip(client), r, now)
            .map_or_else(|r| r.reason(), |_| "ok")
    };
    (a, t0, try_at)
}

/// Lines of `input | what it shows as, or its error`.
const PARSED: &str = r#"
10.0.0.0/8 | 10.0.0.0/8
192.0.2.7 | 192.0.2.7
192.0.2.7/32 | 192.0.2.7
0.0.0.0/0 | 0.0.0.0/0
2001:db8::/32 | 2001:db8::/32
::1 | ::1
::1/128 | ::1
::/0 | ::/0
10.0.0.0/33 | "10.0.0.0/33": prefix length must be 0-32 for IPv4
10.0.0.0/+8 | "10.0.0.0/+8": prefix length must be 0-32 for IPv4
10.0.0.0/ | "10.0.0.0/": prefix length must be 0-32 for IPv4
::/129 | "::/129": prefix length must be 0-128 for IPv6
10.0.0.1/8 | "10.0.0.1/8": host bits set; did you mean "10.0.0.0/8"?
2001:db8::1/32 | "2001:db8::1/32": host bits set; did you mean "2001:db8::/32"?
0.0.0.1/0 | "0.0.0.1/0": host bits set; did you mean "0.0.0.0/0"?
bogus | "bogus": expected an IPv4 or IPv6 address, optionally with /PREFIX
10.0.0/8 | "10.0.0/8": expected an IPv4 or IPv6 address, optionally with /PREFIX
 | "": expected an IPv4 or IPv6 address, optionally with /PREFIX"#;

/// Lines of `range client yes|no`.
const MATCHES: &str = "
10.0.0.0/8 10.255.0.1 yes
10.0.0.0/8 ::ffff:10.1.2.3 yes
10.0.0.0/8 11.0.0.0 no
192.0.2.7 192.0.2.7 yes
192.0.2.7/32 192.0.2.8 no
0.0.0.0/0 1.2.3.4 yes
0.0.0.0/0 ::ffff:1.2.3.4 yes
0.0.0.0/0 ::1 no
2001:db8::/32 2001:db8:ffff::1 yes
2001:db8::/32 2001:db9:: no
::/0 ::1 yes
::/0 1.2.3.4 no
::/0 ::ffff:1.2.3.4 no
::1/128 ::1 yes
::1 ::2 no";

#[test]
fn ranges_parse_show_match_and_explain_errors() {
    for (input, expected) in PARSED.lines().skip(1).filter_map(|l| l.split_once(" | ")) {
        let got = input.parse::<Cidr>().map(|c| c.to_string());
        assert_eq!(got.unwrap_or_else(|e| e), expected, "{input:?}");
    }
    for line in MATCHES.lines().skip(1) {
        let words: Vec<_> = line.split(' ').collect();
        let contains = cidr(words[0]).contains(ip(words[1]).unwrap());
        assert_eq!(contains, words[2] == "yes", "{line}");
    }
}

#[test]
fn deny_wins_and_a_nonempty_allow_must_match() {
    let open = rules(|r| r.deny = vec![cidr("10.6.6.0/24")]);
    let strict = rules(|r| (r.deny, r.allow) = (open.deny.clone(), vec![cidr("10.0.0.0/8")]));
    let ((_, _, open), (_, _, strict)) = (service(&open), service(&strict));
    let clients = [
        "10.1.1.1",
        "10.6.6.6",
        "::ffff:10.6.6.1",
        "192.0.2.1",
        "::1",
        "unix",
    ];
    let got = clients.map(|c| format!("{c} {} {}", open(0, c), strict(0, c)));
    let expected = "10.1.1.1 ok ok, 10.6.6.6 denied denied, ::ffff:10.6.6.1 denied denied, \
                    192.0.2.1 ok denied, ::1 ok denied, unix ok ok";
    assert_eq!(got.join(", "), expected);
    assert_eq!(Refusal::Denied.to_string(), "not in allow or in deny");
}

#[test]
fn sources_are_counted_until_their_guards_drop() {
    let (a, now) = (Admission::new(), Instant::now());
    let r = rules(|r| r.max_per_source = Some(2));
    let admit = |client: &str| a.admit(ip(client), &r, now).map_err(|r| r.to_string());
    let full = Err("at max_per_source (2)".to_owned());
    let first = admit("2001:db8:1:1::1").unwrap();
    let second = admit("2001:db8:1:1:ffff::2").unwrap(); // the same /64
    assert_eq!(a.count("2001:db8:1:1::99".parse().unwrap(), &r), 2);
    assert_eq!(admit("2001:db8:1:1::3").map(drop), full);
    let other_64 = admit("2001:db8:1:2::1").unwrap();
    let v4 = [admit("192.0.2.1"), admit("::ffff:192.0.2.1")].map(Result::unwrap);
    assert_eq!(admit("192.0.2.1").map(drop), full);
    assert!(admit("192.0.2.2").is_ok()); // IPv4 counts per address
    drop(first);
    assert_eq!(a.count("2001:db8:1:1::1".parse().unwrap(), &r), 1);
    let again = admit("2001:db8:1:1::1").unwrap();
    drop((again, second, other_64, v4));
    assert_eq!(a.tracked(), 0);
}

#[test]
fn the_default_bound_leaves_loopback_clients_alone() {
    let a = Admission::new();
    let now = Instant::now();
    let r = rules(|r| (r.max_per_source, r.loopback_counted) = (Some(1), false));
    let admit = |client: &str| a.admit(ip(client), &r, now).map_err(|r| r.to_string());
    let full = Err("at max_per_source (1)".to_owned());
    let held = admit("192.0.2.1").unwrap();
    assert_eq!(admit("192.0.2.1").map(drop), full);
    let local = ["127.0.0.1", "127.0.0.1", "::1", "::1", "::ffff:127.0.0.1"];
    let locals: Vec<_> = local.map(|c| admit(c).unwrap()).into();
    // Set by hand, the bound counts loopback clients too.
    let strict = Rules {
        loopback_counted: true,
        ..r.clone()
    };
    let refused = a.admit(ip("127.0.0.1"), &strict, now).map(drop);
    assert_eq!(refused.map_err(|r| r.to_string()), full);
    drop((held, locals));
    assert_eq!(a.tracked(), 0);
}

#[test]
fn buckets_allow_a_burst_then_refill_at_the_rate() {
    let r = rules(|r| r.rate_per_source = Some(2.0));
    let (_, _, at) = service(&r);
    let x = "192.0.2.1";
    let no = "rate-per-source";
    assert_eq!([at(0, x), at(0, x), at(0, x)], ["ok", "ok", no]);
    assert_eq!(at(0, "192.0.2.2"), "ok"); // another source, its own bucket
    assert_eq!([at(499, x), at(500, x), at(500, x)], [no, "ok", no]); // 1/rate s
    let burst = [at(100_000, x), at(100_000, x), at(100_000, x)];
    assert_eq!(burst, ["ok", "ok", no]); // full at max(1, rate)
    assert_eq!(Refusal::RatePerSource.to_string(), "over rate_per_source");
}

#[test]
fn refused_clients_take_no_tokens() {
    // The service refills in 1 s, a source in 2 s.
    let r = rules(|r| (r.rate, r.rate_per_source) = (Some(1.0), Some(0.5)));
    let r = Rules {
        max_per_source: Some(1),
        ..r
    };
    let (a, t0, at) = service(&r);
    let (x, y, z) = ("192.0.2.1", "192.0.2.2", "192.0.2.3");
    let held = a.admit(ip(x), &r, t0).unwrap();
    assert_eq!(at(0, y), "rate");
    assert_eq!(at(1000, y), "ok"); // y's bucket was left full
    assert_eq!([at(2000, x), at(2000, z)], ["max-per-source", "ok"]);
    drop(held);
    assert_eq!([at(2000, x), at(3000, x)], ["rate", "ok"]);

    let r = rules(|r| (r.rate, r.rate_per_source) = (Some(10.0), Some(1.0)));
    let (_, _, at) = service(&r);
    let x_again: Vec<_> = (0..20).map(|_| at(0, x)).collect();
    assert_eq!(x_again[1..], ["rate-per-source"; 19]);
    let others: Vec<_> = (1..=10).map(|n| at(0, &format!("10.0.0.{n}"))).collect();
    assert_eq!(others, [&["ok"; 9][..], &["rate"]].concat()); // x took 1 of 10
    assert_eq!(Refusal::Rate.to_string(), "over rate");
}

#[test]
fn unix_clients_meet_only_the_service_rate() {
    let r = rules(|r| {
        (r.allow, r.max_per_source) = (vec![cidr("10.0.0.0/8")], Some(1));
        (r.rate_per_source, r.rate) = (Some(1.0), Some(2.0));
    });
    let (a, _, at) = service(&r);
    assert_eq!(
        [at(0, "unix"), at(0, "unix"), at(0, "unix")],
        ["ok", "ok", "rate"]
    );
    assert_eq!(a.tracked(), 0);
}

#[test]
fn a_flood_of_sources_leaves_bounded_state() {
    let r = rules(|r| (r.rate_per_source, r.max_per_source) = (Some(10.0), Some(4)));
    let (a, _, at) = service(&r);
    let mut most = 0;
    for i in 0..100_000u64 {
        // A new /64 each millisecond; a bucket refills in 100 ms.
        let client = Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(i) << 64 | 1);
        assert_eq!(at(i, &client.to_string()), "ok");
        most = most.max(a.tracked());
    }
    assert!(most <= PRUNE_MIN, "{most} entries");
}

proptest! {
    #[test]
    fn parsing_never_panics_and_shown_ranges_parse_back(
        any in "\\PC{0,50}", likely in "[0-9a-f:.]{0,40}(/[0-9]{1,3})?") {
        let _ = any.parse::<Cidr>();
        if let Ok(c) = likely.parse::<Cidr>() {
            prop_assert_eq!(c.to_string().parse::<Cidr>(), Ok(c));
        }
    }

    #[test]
    fn every_range_parses_back(bits: u128, v6: bool, prefix in 0u8..=128) {
        let (addr, prefix) = match v6 {
            true => (IpAddr::V6(bits.into()), prefix),
            false => (IpAddr::V4((bits as u32).into()), prefix % 33),
        };
        let c = Cidr { network: mask(addr, prefix), prefix };
        prop_assert_eq!(c.to_string().parse::<Cidr>(), Ok(c));
    }
}
