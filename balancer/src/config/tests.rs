use super::*;

const GOOD: &str = r#"
[lan]
interfaces = ["lan0"]
networks = ["198.18.0.0/24"]

[[uplink]]
name = "dsl1"
interface = "wan1"
gateway = "198.18.1.1"
source = "198.18.1.2"
weight = 2

[[uplink]]
name = "lte"
interface = "wan2"
gateway = "198.18.2.1"
source = "198.18.2.2"
"#;

#[test]
fn parses_the_documented_example_with_derived_ids_tables_and_marks() {
    let config = Config::parse(GOOD).unwrap();
    assert_eq!(config.uplinks.len(), 2);
    let lte = &config.uplinks[1];
    assert_eq!(
        (lte.id, lte.table, lte.mark, lte.weight),
        (2, 2002, 0x0200_0000, 1)
    );
}

fn error_of(text: &str) -> ConfigError {
    Config::parse(text).unwrap_err()
}

#[test]
fn each_bad_value_names_its_key_and_line() {
    let cases: &[(&str, &str, &str, usize)] = &[
        ("weight = 2", "weight = 0", "uplink[0].weight", 11),
        (
            "gateway = \"198.18.1.1\"",
            "gateway = \"198.18.1\"",
            "uplink[0].gateway",
            9,
        ),
        (
            "\"198.18.0.0/24\"",
            "\"198.18.0.0/33\"",
            "lan.networks[0]",
            4,
        ),
        (
            "\"198.18.0.0/24\"",
            "\"198.18.0.1/24\"",
            "lan.networks[0]",
            4,
        ),
        ("name = \"lte\"", "name = \"dsl1\"", "uplink[1].name", 14),
        (
            "source = \"198.18.2.2\"",
            "source = \"198.18.1.2\"",
            "uplink[1].source",
            17,
        ),
        (
            "interface = \"wan2\"",
            "interface = \"lan0\"",
            "uplink[1].interface",
            15,
        ),
        (
            "interface = \"wan2\"",
            "interface = \"a/b\"",
            "uplink[1].interface",
            15,
        ),
    ];
    for (from, to, key, line) in cases {
        let error = error_of(&GOOD.replacen(from, to, 1));
        assert_eq!(
            (error.key.as_str(), error.line),
            (*key, Some(*line)),
            "{from} -> {to}: {error}"
        );
    }
}

#[test]
fn duplicate_ids_tables_and_marks_are_refused() {
    let dup_id = GOOD.replace("weight = 2", "weight = 2\nid = 2");
    assert_eq!(error_of(&dup_id).key, "uplink[1].id");
    let dup_table = GOOD.replace("weight = 2", "weight = 2\ntable = 2002");
    assert_eq!(error_of(&dup_table).key, "uplink[1].table");
    let dup_mark = GOOD.replace("weight = 2", "weight = 2\nmark = 0x02000000");
    assert_eq!(error_of(&dup_mark).key, "uplink[1].mark");
    let foreign_mark = GOOD.replace("weight = 2", "weight = 2\nmark = 0x100");
    assert_eq!(error_of(&foreign_mark).key, "uplink[0].mark");
    let main_table = GOOD.replace("weight = 2", "weight = 2\ntable = 254");
    assert_eq!(error_of(&main_table).key, "uplink[0].table");
}

#[test]
fn bad_toml_and_unknown_keys_report_a_line() {
    let broken = error_of("[lan\ninterfaces = []");
    assert_eq!(broken.line, Some(1));
    let unknown = error_of(&GOOD.replace("weight = 2", "wieght = 2"));
    assert_eq!(unknown.key, "uplink[0].wieght", "{unknown}");
    assert_eq!(unknown.line, Some(11));
    let missing = error_of(&GOOD.replace("interface = \"wan2\"\n", ""));
    assert!(missing.message.contains("interface"), "{missing}");
    // `gateway` and `source` may be left out: they are learned from the kernel.
    let learned = Config::parse(&GOOD.replace("gateway = \"198.18.2.1\"\n", "")).unwrap();
    assert_eq!(learned.uplinks[1].gateway, None);
    let shared = error_of(&GOOD.replace("\"wan2\"", "\"wan1\""));
    assert_eq!(shared.key, "uplink[1].interface", "{shared}");
}

#[test]
fn the_dataplane_section_has_defaults_and_checks_its_values() {
    let config = Config::parse(GOOD).unwrap();
    assert_eq!(config.dataplane, Dataplane::default());
    let tuned = Config::parse(&format!(
        "{GOOD}\n[dataplane]\nflow_entries = 4096\nnat_port_min = 62000\n"
    ))
    .unwrap();
    assert_eq!(
        (tuned.dataplane.flow_entries, tuned.dataplane.nat_port_min),
        (4096, 62000)
    );
    let narrow = error_of(&format!("{GOOD}\n[dataplane]\nnat_port_min = 65530\n"));
    assert_eq!(narrow.key, "dataplane.nat_port_max");
    let tiny = error_of(&format!("{GOOD}\n[dataplane]\nflow_entries = 10\n"));
    assert_eq!(
        (tiny.key.as_str(), tiny.line),
        ("dataplane.flow_entries", Some(20))
    );
}

#[test]
fn no_uplinks_is_an_error() {
    let error = error_of("[lan]\ninterfaces = [\"lan0\"]\nnetworks = [\"198.18.0.0/24\"]\n");
    assert_eq!(error.key, "uplink");
}

#[test]
fn track_dns_health_and_proxy_sections_parse_and_check() {
    let text = GOOD.replace(
        "weight = 2\n",
        "weight = 2\ntrack = [\"198.18.9.1\", \"tcp:198.18.9.1:443\"]\ndns = [\"198.18.9.53\"]\n",
    );
    let config = Config::parse(&format!("{text}\n[health]\ninterval_ms = 100\n\n[proxy]\nlisten = \"198.18.0.1:3128\"\npolicy = \"sticky-site\"\nsticky_timeout = \"10m\"\n")).unwrap();
    let dsl = &config.uplinks[0];
    assert_eq!(
        dsl.track.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
        ["198.18.9.1", "tcp:198.18.9.1:443"]
    );
    assert_eq!(
        dsl.dns,
        ["198.18.9.53".parse::<std::net::Ipv4Addr>().unwrap()]
    );
    assert_eq!(config.health.interval_ms, 100);
    assert_eq!(config.health.down_after, Health::default().down_after);
    let proxy = config.proxy.unwrap();
    assert_eq!(
        (
            proxy.policy,
            proxy.sticky_timeout.as_secs(),
            proxy.connect_ports
        ),
        (proxy::Policy::StickySite, 600, vec![443])
    );

    let bad_target =
        error_of(&GOOD.replace("weight = 2\n", "weight = 2\ntrack = [\"udp:1.2.3.4:5\"]\n"));
    assert_eq!(
        (bad_target.key.as_str(), bad_target.line),
        ("uplink[0].track[0]", Some(12))
    );
    let bad_policy = error_of(&format!(
        "{GOOD}\n[proxy]\nlisten = \"198.18.0.1:3128\"\npolicy = \"random\"\n"
    ));
    assert_eq!(bad_policy.key, "proxy.policy");
    let bad_health = error_of(&format!("{GOOD}\n[health]\ndown_after = 0\n"));
    assert_eq!(bad_health.key, "health.down_after");
}

#[test]
fn route_tables_and_pass_untranslated() {
    let with = |lines: &str| {
        GOOD.replace(
            "networks = [\"198.18.0.0/24\"]",
            &format!("networks = [\"198.18.0.0/24\"]\n{lines}"),
        )
    };
    let config =
        Config::parse(&with("route_tables = [220, 100]\npass_untranslated = true")).unwrap();
    assert_eq!(config.lan.route_tables, [220, 100]);
    assert!(config.lan.pass_untranslated);
    let defaults = Config::parse(GOOD).unwrap();
    assert!(defaults.lan.route_tables.is_empty());
    assert!(!defaults.lan.pass_untranslated);
    for (bad, message) in [
        ("route_tables = [2001]", "balancer's own"),
        ("route_tables = [254]", "main table"),
        ("route_tables = [255]", "local table"),
        ("route_tables = [0]", "not a routing table id"),
        ("route_tables = [220, 220]", "listed twice"),
    ] {
        let error = error_of(&with(bad));
        assert!(error.key.starts_with("lan.route_tables["), "{bad}: {error}");
        assert_eq!(error.line, Some(5), "{bad}: {error}");
        assert!(error.message.contains(message), "{bad}: {error}");
    }
    let error = error_of(&with("pass_untranslated = 1"));
    assert_eq!(error.line, Some(5), "{error}");
}

#[test]
fn filtering_defaults_to_address_and_port_dependent_and_names_its_line_when_wrong() {
    let defaults = Config::parse(GOOD).unwrap();
    assert_eq!(
        defaults.dataplane.filtering,
        crate::config::Filtering::AddressAndPortDependent
    );
    let cone = Config::parse(&format!(
        "{GOOD}\n[dataplane]\nfiltering = \"endpoint-independent\"\n"
    ))
    .unwrap();
    assert_eq!(
        cone.dataplane.filtering,
        crate::config::Filtering::EndpointIndependent
    );
    let text = format!("{GOOD}\n[dataplane]\nfiltering = \"full-cone\"\n");
    let error = error_of(&text);
    assert_eq!(error.key, "dataplane.filtering");
    assert_eq!(error.line, Some(text.lines().count()));
    assert!(
        error.message.contains("endpoint-independent"),
        "{}",
        error.message
    );
}
