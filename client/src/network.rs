//! Sandbox networks as the API takes them: a mode, and for egress what the guest may reach,
//! by network (`192.0.2.0/24`) or by name (`api.example.org`, `*.example.com`).

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A sandbox's network mode, as asked for at creation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum NetworkMode {
    /// No network device (or, restored from a snapshot that had one, a device on a TAP that
    /// leads nowhere). A struct variant so that unknown fields are refused.
    None {},
    /// Outgoing connections through NAT, to the allow-list only if one is given, never to
    /// what the deny-list names.
    Egress {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(value_type = Option<Vec<String>>, example = json!(["192.0.2.0/24", "*.example.com"]))]
        allow: Option<Vec<EgressRule>>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        #[schema(value_type = Vec<String>, example = json!(["internal.example.com"]))]
        deny: Vec<EgressRule>,
    },
}

impl NetworkMode {
    /// An egress network open to public addresses.
    pub fn open_egress() -> NetworkMode {
        NetworkMode::Egress {
            allow: None,
            deny: Vec::new(),
        }
    }

    /// Its egress policy (none: mode `none`).
    pub fn policy(&self) -> Option<NetworkPolicy> {
        match self {
            NetworkMode::None {} => None,
            NetworkMode::Egress { allow, deny } => Some(NetworkPolicy {
                allow: allow.clone(),
                deny: deny.clone(),
            }),
        }
    }
}

/// What an egress sandbox may reach: the body of `PATCH /sandboxes/{id}/network`, which
/// replaces both lists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicy {
    /// Networks and names the guest may reach (absent: any public address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<String>>, example = json!(["api.example.org", "*.example.com", "192.0.2.0/24"]))]
    pub allow: Option<Vec<EgressRule>>,
    /// Networks and names it may not, even where the allow-list matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<String>)]
    pub deny: Vec<EgressRule>,
}

impl From<NetworkPolicy> for NetworkMode {
    fn from(policy: NetworkPolicy) -> NetworkMode {
        NetworkMode::Egress {
            allow: policy.allow,
            deny: policy.deny,
        }
    }
}

/// One entry of an allow- or deny-list.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum EgressRule {
    Network(Cidr),
    Domain(DomainPattern),
}

/// Text that is neither an IPv4 network nor a domain name pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressRuleError {
    #[error(transparent)]
    Network(#[from] CidrError),
    #[error("{text:?} is not a domain name or pattern ({why})")]
    Domain { text: String, why: &'static str },
}

impl std::str::FromStr for EgressRule {
    type Err = EgressRuleError;
    fn from_str(text: &str) -> Result<EgressRule, EgressRuleError> {
        // Digits and dots only (or a prefix length): meant as an address, so refused as one.
        let numeric = !text.is_empty() && text.chars().all(|c| c.is_ascii_digit() || c == '.');
        if text.contains('/') || numeric {
            return Ok(EgressRule::Network(text.parse()?));
        }
        Ok(EgressRule::Domain(text.parse()?))
    }
}

impl TryFrom<String> for EgressRule {
    type Error = EgressRuleError;
    fn try_from(text: String) -> Result<EgressRule, EgressRuleError> {
        text.parse()
    }
}

impl From<EgressRule> for String {
    fn from(rule: EgressRule) -> String {
        rule.to_string()
    }
}

impl std::fmt::Display for EgressRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EgressRule::Network(cidr) => cidr.fmt(f),
            EgressRule::Domain(pattern) => pattern.fmt(f),
        }
    }
}

/// A domain name (`api.example.org`: that name only) or a wildcard (`*.example.com`: every
/// name under it, at any depth, but not `example.com` itself). Kept lowercase, without a
/// trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DomainPattern {
    pub wildcard: bool,
    /// The name, or what the wildcard's names end in.
    pub base: String,
}

/// The longest domain name, in characters (RFC 1035, without the root's dot).
pub const MAX_DOMAIN_LEN: usize = 253;

impl DomainPattern {
    /// Whether `name` (any case, a trailing dot or not) is one this pattern names.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        if !self.wildcard {
            return name == self.base;
        }
        name.len() > self.base.len() + 1
            && name.ends_with(&self.base)
            && name.as_bytes()[name.len() - self.base.len() - 1] == b'.'
    }
}

impl std::str::FromStr for DomainPattern {
    type Err = EgressRuleError;
    fn from_str(text: &str) -> Result<DomainPattern, EgressRuleError> {
        let bad = |why| EgressRuleError::Domain {
            text: text.to_string(),
            why,
        };
        let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
        let (wildcard, base) = match name.strip_prefix("*.") {
            Some(base) => (true, base.to_string()),
            None => (false, name),
        };
        if base.is_empty() || base.len() > MAX_DOMAIN_LEN {
            return Err(bad("1 to 253 characters"));
        }
        let labels: Vec<&str> = base.split('.').collect();
        for label in &labels {
            if label.is_empty() || label.len() > 63 {
                return Err(bad("each label has 1 to 63 characters"));
            }
            let allowed = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
            if !label.chars().all(allowed) {
                return Err(bad(
                    "letters, digits, '-' and '_' only, and '*' only as a whole first label",
                ));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(bad("no label begins or ends with '-'"));
            }
        }
        if labels.len() < 2 {
            return Err(bad(
                "at least two labels: a wildcard over a whole top-level domain is too broad",
            ));
        }
        if !labels
            .last()
            .is_some_and(|l| l.starts_with(|c: char| c.is_ascii_alphabetic()))
        {
            return Err(bad("its last label begins with a letter"));
        }
        Ok(DomainPattern { wildcard, base })
    }
}

impl std::fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.base)
    }
}

/// An IPv4 network, `a.b.c.d/n` (`a.b.c.d` alone is a /32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
}

impl Cidr {
    /// Whether `address` is in this network.
    pub fn contains(&self, address: Ipv4Addr) -> bool {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0);
        u32::from(address) & mask == u32::from(self.address) & mask
    }
}

/// Text that is not an IPv4 network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not an IPv4 network (a.b.c.d/n)")]
pub struct CidrError {
    pub text: String,
}

impl TryFrom<String> for Cidr {
    type Error = CidrError;
    fn try_from(text: String) -> Result<Cidr, CidrError> {
        text.parse()
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        c.to_string()
    }
}

impl std::str::FromStr for Cidr {
    type Err = CidrError;
    fn from_str(text: &str) -> Result<Cidr, CidrError> {
        let bad = || CidrError {
            text: text.to_string(),
        };
        let (address, prefix) = text.split_once('/').unwrap_or((text, "32"));
        let address: Ipv4Addr = address.parse().map_err(|_| bad())?;
        let prefix_len: u8 = prefix.parse().map_err(|_| bad())?;
        let leading_zero = prefix.len() > 1 && prefix.starts_with('0');
        if prefix_len > 32 || prefix.starts_with('+') || leading_zero {
            return Err(bad());
        }
        Ok(Cidr {
            address,
            prefix_len,
        })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rule(text: &str) -> EgressRule {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn rules_are_networks_or_names() {
        assert_eq!(
            rule("192.0.2.7"),
            EgressRule::Network("192.0.2.7/32".parse().unwrap())
        );
        assert_eq!(rule("API.Example.org.").to_string(), "api.example.org");
        assert_eq!(rule("*.example.com").to_string(), "*.example.com");
        for (bad, says) in [
            ("10.0.0.0/33", "not an IPv4 network"),
            ("300.0.0.1", "not an IPv4 network"),
            ("localhost", "at least two labels"),
            ("*.com", "at least two labels"),
            ("*", "'*' only as a whole first label"),
            ("a.*.example.com", "'*' only as a whole first label"),
            ("**.example.com", "'*' only"),
            ("exa mple.com", "letters, digits"),
            ("-a.example.com", "begins or ends"),
            ("a..example.com", "1 to 63"),
            ("example.123", "last label"),
            ("example.1com", "last label"),
            ("", "1 to 253"),
        ] {
            let error = bad.parse::<EgressRule>().unwrap_err().to_string();
            assert!(error.contains(says), "{bad}: {error}");
        }
        let long = format!("{}.example.com", "a".repeat(64));
        assert!(long.parse::<EgressRule>().is_err());
    }

    #[test]
    fn wildcards_match_names_under_them_only() {
        let EgressRule::Domain(wild) = rule("*.example.com") else {
            panic!()
        };
        for name in ["a.example.com", "A.B.Example.COM.", "x-y.example.com"] {
            assert!(wild.matches(name), "{name}");
        }
        for name in [
            "example.com",
            "aexample.com",
            "example.com.evil.org",
            "a.example.co",
        ] {
            assert!(!wild.matches(name), "{name}");
        }
        let EgressRule::Domain(exact) = rule("api.example.org") else {
            panic!()
        };
        assert!(exact.matches("API.example.org."));
        assert!(!exact.matches("x.api.example.org"));
    }

    #[test]
    fn networks_contain_their_addresses() {
        let net: Cidr = "198.51.100.0/24".parse().unwrap();
        assert!(net.contains("198.51.100.255".parse().unwrap()));
        assert!(!net.contains("198.51.101.0".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.9".parse().unwrap()));
    }

    #[test]
    fn modes_parse_with_both_lists() {
        let mode: NetworkMode = serde_json::from_value(
            json!({"mode": "egress", "allow": ["*.example.com", "192.0.2.0/24"], "deny": ["a.example.com"]}),
        )
        .unwrap();
        let policy = mode.policy().unwrap();
        assert_eq!(policy.allow.as_ref().map(Vec::len), Some(2));
        assert_eq!(policy.deny, vec![rule("a.example.com")]);
        assert_eq!(
            serde_json::to_value(&mode).unwrap(),
            json!({"mode": "egress", "allow": ["*.example.com", "192.0.2.0/24"], "deny": ["a.example.com"]})
        );
        assert!(
            serde_json::from_value::<NetworkMode>(json!({"mode": "none", "deny": []})).is_err()
        );
        assert!(serde_json::from_value::<NetworkPolicy>(json!({"allow": ["*"]})).is_err());
        assert!(serde_json::from_value::<NetworkPolicy>(json!({"mode": "egress"})).is_err());
    }
}
