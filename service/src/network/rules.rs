//! The nftables rules of sandbox networks, as `nft -f` scripts: table `ip sandbox` in a
//! sandbox's namespace, and in the host's table `ip ember` a chain and a name set per link.
//!
//! Every script is idempotent (`add` then `flush`, then the rules): the same one makes a
//! sandbox's rules and replaces them when its policy changes, in one transaction, so no packet
//! ever meets half a policy.

use std::net::Ipv4Addr;

use ember_client::types::{Cidr, EgressRule, NetworkPolicy};

use super::{LINKS, NON_PUBLIC, TAP_ADDRESS, TAP_NAME, UPLINK_NAME};

/// The name set of a sandbox's namespace: the addresses its allowed names resolved to.
pub const SANDBOX_NAMES_SET: &str = "names";

/// What a guest may start connections to, reduced to what nftables matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reach {
    /// Networks it may reach (none: any public address).
    pub allow: Option<Vec<Cidr>>,
    /// Whether its allow-list names domains (the addresses they resolve to are allowed).
    pub names: bool,
    /// Networks it may never reach.
    pub deny: Vec<Cidr>,
}

impl Reach {
    pub fn of(policy: &NetworkPolicy) -> Reach {
        let networks = |rules: &[EgressRule]| -> Vec<Cidr> {
            rules
                .iter()
                .filter_map(|rule| match rule {
                    EgressRule::Network(cidr) => Some(*cidr),
                    EgressRule::Domain(_) => None,
                })
                .collect()
        };
        Reach {
            allow: policy.allow.as_deref().map(networks),
            names: policy
                .allow
                .iter()
                .flatten()
                .any(|rule| matches!(rule, EgressRule::Domain(_))),
            deny: networks(&policy.deny),
        }
    }

    /// Rule bodies (verdict accept or drop) in order, `names_set` being the set of resolved
    /// addresses. Names only ever come from the sandbox's own resolver: name-server traffic
    /// to anywhere else is dropped first.
    fn rules(&self, names_set: &str) -> Vec<String> {
        let mut rules = vec![
            "udp dport 53 drop".to_string(),
            "tcp dport { 53, 853 } drop".to_string(),
        ];
        if !self.deny.is_empty() {
            rules.push(format!("ip daddr {{ {} }} drop", join(&self.deny)));
        }
        match &self.allow {
            Some(allow) => {
                if self.names {
                    rules.push(format!("ip daddr @{names_set} accept"));
                }
                if !allow.is_empty() {
                    rules.push(format!("ip daddr {{ {} }} accept", join(allow)));
                }
            }
            None => {
                let (links, links_len) = LINKS;
                let blocked: Vec<String> = NON_PUBLIC
                    .iter()
                    .map(|r| r.to_string())
                    .chain([format!("{links}/{links_len}")])
                    .collect();
                rules.push(format!("ip daddr {{ {} }} drop", blocked.join(", ")));
                rules.push("accept".to_string());
            }
        }
        rules
    }
}

fn join(networks: &[Cidr]) -> String {
    networks
        .iter()
        .map(Cidr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn elements(addresses: &[Ipv4Addr]) -> String {
    addresses
        .iter()
        .map(Ipv4Addr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The sandbox namespace's table: masquerade behind the uplink, what the guest may reach
/// (`names`: the addresses its allowed names resolve to now), and on the TAP nothing but
/// replies and queries to its resolver.
pub fn sandbox_table(reach: &Reach, names: &[Ipv4Addr]) -> String {
    let t = "ip sandbox";
    let mut script = format!(
        "add table {t}\n\
         add set {t} {SANDBOX_NAMES_SET} {{ type ipv4_addr; }}\n\
         flush set {t} {SANDBOX_NAMES_SET}\n\
         add chain {t} postrouting {{ type nat hook postrouting priority srcnat; }}\n\
         flush chain {t} postrouting\n\
         add rule {t} postrouting oifname \"{UPLINK_NAME}\" masquerade\n\
         add chain {t} forward {{ type filter hook forward priority filter; policy drop; }}\n\
         flush chain {t} forward\n\
         add rule {t} forward ct state established,related accept\n"
    );
    for rule in reach.rules(SANDBOX_NAMES_SET) {
        script.push_str(&format!(
            "add rule {t} forward iifname \"{TAP_NAME}\" oifname \"{UPLINK_NAME}\" {rule}\n"
        ));
    }
    script.push_str(&format!(
        "add chain {t} input {{ type filter hook input priority filter; policy accept; }}\n\
         flush chain {t} input\n\
         add rule {t} input iifname \"{TAP_NAME}\" ct state established,related accept\n\
         add rule {t} input iifname \"{TAP_NAME}\" ip daddr {TAP_ADDRESS} udp dport 53 accept\n\
         add rule {t} input iifname \"{TAP_NAME}\" ip daddr {TAP_ADDRESS} tcp dport 53 accept\n\
         add rule {t} input iifname \"{TAP_NAME}\" drop\n"
    ));
    if !names.is_empty() {
        script.push_str(&format!(
            "add element {t} {SANDBOX_NAMES_SET} {{ {} }}\n",
            elements(names)
        ));
    }
    script
}

/// The host's part, shared by all sandboxes: the links masqueraded, nothing they start
/// reaching the host, and a verdict map leading each link to its chain.
pub fn host_table() -> String {
    let (net, len) = LINKS;
    format!(
        "table ip ember {{\n\
         map links {{ type ifname : verdict; }}\n\
         chain postrouting {{ type nat hook postrouting priority srcnat; ip saddr {net}/{len} oifname != \"em*\" masquerade\n}}\n\
         chain input {{ type filter hook input priority filter; policy accept;\n\
         iifname \"em*\" ct state established,related accept\n\
         iifname \"em*\" drop\n}}\n\
         chain forward {{ type filter hook forward priority filter; policy accept;\n\
         iifname \"em*\" ct state established,related accept\n\
         iifname \"em*\" iifname vmap @links\n\
         iifname \"em*\" drop\n}}\n\
         }}\n"
    )
}

/// The set of link `veth`'s resolved addresses in the host's table.
pub fn link_names_set(veth: &str) -> String {
    format!("{veth}_names")
}

/// The host's chain and name set for one sandbox link `veth`, joined to the link in the
/// map: the same policy as in the sandbox's namespace.
pub fn link_rules(veth: &str, reach: &Reach, names: &[Ipv4Addr]) -> String {
    let set = link_names_set(veth);
    let mut script = format!(
        "add set ip ember {set} {{ type ipv4_addr; }}\n\
         flush set ip ember {set}\n\
         add chain ip ember {veth}\n\
         flush chain ip ember {veth}\n"
    );
    for rule in reach.rules(&set) {
        script.push_str(&format!("add rule ip ember {veth} {rule}\n"));
    }
    script.push_str(&format!(
        "add element ip ember links {{ \"{veth}\" : jump {veth} }}\n"
    ));
    if !names.is_empty() {
        script.push_str(&format!(
            "add element ip ember {set} {{ {} }}\n",
            elements(names)
        ));
    }
    script
}

/// Removes link `veth`'s chain and set from the host's table.
pub fn unlink(veth: &str) -> String {
    format!(
        "delete element ip ember links {{ \"{veth}\" }}\n\
         delete chain ip ember {veth}\n\
         delete set ip ember {}\n",
        link_names_set(veth)
    )
}

/// Adds and removes resolved addresses in a name set (`table` `set`).
pub fn names_change(table: &str, set: &str, added: &[Ipv4Addr], removed: &[Ipv4Addr]) -> String {
    let mut script = String::new();
    if !removed.is_empty() {
        script.push_str(&format!(
            "delete element {table} {set} {{ {} }}\n",
            elements(removed)
        ));
    }
    if !added.is_empty() {
        script.push_str(&format!(
            "add element {table} {set} {{ {} }}\n",
            elements(added)
        ));
    }
    script
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: Option<&[&str]>, deny: &[&str]) -> NetworkPolicy {
        let parse = |list: &[&str]| list.iter().map(|r| r.parse().unwrap()).collect();
        NetworkPolicy {
            allow: allow.map(parse),
            deny: parse(deny),
        }
    }

    fn position(script: &str, needle: &str) -> usize {
        script
            .find(needle)
            .unwrap_or_else(|| panic!("no {needle:?} in:\n{script}"))
    }

    #[test]
    fn an_open_policy_reaches_public_addresses_only_and_names_only_through_its_resolver() {
        let open = sandbox_table(&Reach::of(&policy(None, &[])), &[]);
        for blocked in [
            "10.200.0.0/16",
            "169.254.0.0/16",
            "10.0.0.0/8",
            "172.16.0.0/12",
        ] {
            assert!(open.contains(blocked), "{blocked}: {open}");
        }
        let dns = position(&open, "udp dport 53 drop");
        let accept = position(&open, "oifname \"uplink\" accept\n");
        assert!(dns < accept, "{open}");
        assert!(
            open.contains("ip daddr 172.16.0.1 udp dport 53 accept"),
            "{open}"
        );
        assert!(!open.contains("@names"), "{open}");
        assert!(!open.contains("add element"), "{open}");
    }

    #[test]
    fn allow_lists_open_their_networks_and_resolved_names_and_deny_lists_come_first() {
        let reach = Reach::of(&policy(
            Some(&["10.99.0.0/24", "*.example.com"]),
            &["10.99.0.7", "a.example.com"],
        ));
        assert_eq!(reach.deny, vec!["10.99.0.7/32".parse().unwrap()]);
        assert!(reach.names);
        let names = ["203.0.113.1".parse().unwrap()];
        let listed = sandbox_table(&reach, &names);
        let deny = position(&listed, "ip daddr { 10.99.0.7/32 } drop");
        let set = position(&listed, "ip daddr @names accept");
        let nets = position(&listed, "ip daddr { 10.99.0.0/24 } accept");
        assert!(deny < set && set < nets, "{listed}");
        assert!(!listed.contains("oifname \"uplink\" accept\n"), "{listed}");
        assert!(
            listed.contains("add element ip sandbox names { 203.0.113.1 }"),
            "{listed}"
        );
        // Without names, no set rule; an empty list reaches nothing.
        let cidrs = sandbox_table(&Reach::of(&policy(Some(&["10.99.0.0/24"]), &[])), &[]);
        assert!(!cidrs.contains("@names"), "{cidrs}");
        let closed = sandbox_table(&Reach::of(&policy(Some(&[]), &[])), &[]);
        assert!(
            !closed.contains("oifname \"uplink\" accept") && !closed.contains("ip daddr {"),
            "{closed}"
        );
    }

    #[test]
    fn the_host_applies_the_same_policy_per_link() {
        let host = link_rules("emabc", &Reach::of(&policy(None, &[])), &[]);
        assert!(host.contains("add chain ip ember emabc\n"), "{host}");
        assert!(host.contains("add set ip ember emabc_names"), "{host}");
        assert!(
            host.contains("add rule ip ember emabc ip daddr { 0.0.0.0/8, 10.0.0.0/8"),
            "{host}"
        );
        assert!(host.contains("add rule ip ember emabc accept\n"), "{host}");
        assert!(
            host.contains("add element ip ember links { \"emabc\" : jump emabc }"),
            "{host}"
        );
        let named = link_rules(
            "emabc",
            &Reach::of(&policy(Some(&["api.example.org"]), &[])),
            &["198.51.100.1".parse().unwrap()],
        );
        assert!(
            named.contains("add rule ip ember emabc ip daddr @emabc_names accept"),
            "{named}"
        );
        assert!(
            named.contains("add element ip ember emabc_names { 198.51.100.1 }"),
            "{named}"
        );
        assert!(!named.contains("emabc accept\n"), "{named}");
    }

    #[test]
    fn name_changes_remove_before_they_add() {
        let a: Ipv4Addr = "198.51.100.1".parse().unwrap();
        let b: Ipv4Addr = "198.51.100.2".parse().unwrap();
        let script = names_change("ip sandbox", "names", &[a], &[b]);
        assert_eq!(
            script,
            "delete element ip sandbox names { 198.51.100.2 }\n\
             add element ip sandbox names { 198.51.100.1 }\n"
        );
        assert_eq!(names_change("ip sandbox", "names", &[], &[]), "");
    }
}
