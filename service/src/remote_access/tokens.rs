//! The bearer tokens remote clients present, read from a file, compared in constant time,
//! and each token's request budget.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;

/// A token shorter than this is refused: it could be guessed.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read the token file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the token file {} holds no token", path.display())]
    Empty { path: PathBuf },
    #[error(
        "line {line} of the token file {}: a token must be at least {MIN_TOKEN_LEN} characters \
         of printable ASCII (`TOKEN` or `NAME TOKEN` per line)",
        path.display()
    )]
    Malformed { path: PathBuf, line: usize },
    #[error("line {line} of the token file {}: the name {name:?} is used twice", path.display())]
    DuplicateName {
        path: PathBuf,
        line: usize,
        name: String,
    },
}

/// One accepted token: a name for logs and rate limits, and the token's digest (the token
/// itself is not kept).
#[derive(Debug, Clone)]
struct Token {
    name: String,
    digest: [u8; 32],
}

/// The tokens of one reading of the token file.
#[derive(Debug, Clone)]
pub struct Tokens {
    tokens: Vec<Token>,
}

fn digest(token: &[u8]) -> [u8; 32] {
    *blake3::hash(token).as_bytes()
}

impl Tokens {
    /// Reads `path`: one token per line (`TOKEN`, or `NAME TOKEN` to name it in logs and
    /// limits); blank lines and lines starting with `#` are skipped.
    pub fn read(path: &Path) -> Result<Tokens, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Tokens::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Tokens, TokenFileError> {
        let mut tokens: Vec<Token> = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line_no = index + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let (name, token) = match (words.next(), words.next(), words.next()) {
                (Some(token), None, None) => (format!("token{}", tokens.len() + 1), token),
                (Some(name), Some(token), None) => (name.to_string(), token),
                _ => {
                    return Err(TokenFileError::Malformed {
                        path: path.to_path_buf(),
                        line: line_no,
                    })
                }
            };
            if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(TokenFileError::Malformed {
                    path: path.to_path_buf(),
                    line: line_no,
                });
            }
            if tokens.iter().any(|t| t.name == name) {
                return Err(TokenFileError::DuplicateName {
                    path: path.to_path_buf(),
                    line: line_no,
                    name,
                });
            }
            tokens.push(Token {
                name,
                digest: digest(token.as_bytes()),
            });
        }
        if tokens.is_empty() {
            return Err(TokenFileError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(Tokens { tokens })
    }

    /// The name of the token `presented` is, if any. Digests of equal length are compared
    /// in constant time, against every token, so neither a token's length nor how much of
    /// it matched shows in the time taken.
    pub fn find(&self, presented: &[u8]) -> Option<&str> {
        let presented = digest(presented);
        let mut found = None;
        for token in &self.tokens {
            if bool::from(token.digest.ct_eq(&presented)) {
                found = Some(token.name.as_str());
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tokens.iter().map(|t| t.name.as_str())
    }
}

/// A token bucket: `rate` requests a second on average, bursts of up to `burst`.
#[derive(Debug, Clone)]
struct Bucket {
    level: f64,
    updated: Instant,
}

/// Each token's request budget.
#[derive(Debug)]
pub struct Budgets {
    rate: f64,
    burst: f64,
    buckets: HashMap<String, Bucket>,
}

impl Budgets {
    pub fn new(rate_per_sec: u32, burst: u32) -> Budgets {
        Budgets {
            rate: f64::from(rate_per_sec.max(1)),
            burst: f64::from(burst.max(1)),
            buckets: HashMap::new(),
        }
    }

    /// Takes one request from `name`'s budget: `Ok` if there was room, else how long until
    /// there is.
    pub fn take(&mut self, name: &str, now: Instant) -> Result<(), Duration> {
        let bucket = self
            .buckets
            .entry(name.to_string())
            .or_insert_with(|| Bucket {
                level: self.burst,
                updated: now,
            });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.level = (bucket.level + elapsed * self.rate).min(self.burst);
        bucket.updated = now;
        if bucket.level >= 1.0 {
            bucket.level -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.level) / self.rate))
        }
    }

    /// Forgets the budgets of tokens no longer accepted.
    pub fn keep_only<'a>(&mut self, names: impl Iterator<Item = &'a str>) {
        let names: std::collections::HashSet<&str> = names.collect();
        self.buckets.retain(|name, _| names.contains(name.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Tokens, TokenFileError> {
        Tokens::parse(text, Path::new("tokens"))
    }

    #[test]
    fn tokens_are_found_by_value_and_named() {
        let tokens = parse("# ci\nalice 0123456789abcdef0123\n\nfedcba9876543210fedc\n").unwrap();
        assert_eq!(tokens.len(), 2);
        assert_eq!(tokens.find(b"0123456789abcdef0123"), Some("alice"));
        assert_eq!(tokens.find(b"fedcba9876543210fedc"), Some("token2"));
        assert_eq!(tokens.find(b"0123456789abcdef012"), None);
        assert_eq!(tokens.find(b""), None);
    }

    #[test]
    fn weak_or_malformed_token_files_are_refused_with_the_line() {
        assert!(matches!(
            parse("short"),
            Err(TokenFileError::Malformed { line: 1, .. })
        ));
        assert!(matches!(
            parse("a b c0123456789abcdef"),
            Err(TokenFileError::Malformed { line: 1, .. })
        ));
        assert!(matches!(
            parse("# nothing\n\n"),
            Err(TokenFileError::Empty { .. })
        ));
        assert!(matches!(
            parse("x 0123456789abcdef\nx fedcba9876543210"),
            Err(TokenFileError::DuplicateName { line: 2, .. })
        ));
        let e = parse("\n\nx é123456789abcdefg").unwrap_err().to_string();
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn a_budget_refills_at_its_rate_and_says_when_to_retry() {
        let mut budgets = Budgets::new(2, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(budgets.take("a", t0).is_ok());
        }
        let wait = budgets.take("a", t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        // Another token has its own budget.
        assert!(budgets.take("b", t0).is_ok());
        assert!(budgets.take("a", t0 + Duration::from_millis(500)).is_ok());
        assert!(budgets.take("a", t0 + Duration::from_millis(500)).is_err());
        budgets.keep_only(["b"].into_iter());
        assert!(budgets.take("a", t0 + Duration::from_millis(500)).is_ok());
    }
}
