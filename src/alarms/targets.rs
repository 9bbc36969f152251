//! Where deliveries go: namespace patterns mapped to webhook URLs, from the
//! settings only, so a client can never make the server call a URL it chose.

use crate::auth::NamespacePattern;

#[derive(Debug, Clone, Default)]
pub struct Targets {
    /// In the order given; the most specific match wins (see `target`).
    routes: Vec<(NamespacePattern, url::Url)>,
}

impl Targets {
    /// `pattern=url` entries separated by `;` or new lines.
    pub fn parse(raw: &str) -> Result<Targets, String> {
        let mut routes = Vec::new();
        for entry in raw.split([';', '\n']).map(str::trim).filter(|e| !e.is_empty()) {
            let (pattern, target) = entry.split_once('=').ok_or_else(|| {
                format!("invalid STATEHOUSE_ALARM_TARGETS entry {entry:?}: expected <namespace pattern>=<http(s) URL>")
            })?;
            let pattern = NamespacePattern::parse(pattern).map_err(|e| format!("STATEHOUSE_ALARM_TARGETS: {e}"))?;
            let url = url::Url::parse(target.trim())
                .map_err(|e| format!("STATEHOUSE_ALARM_TARGETS: invalid URL {:?}: {e}", target.trim()))?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(format!("STATEHOUSE_ALARM_TARGETS: {url} is not an http(s) URL with a host"));
            }
            routes.push((pattern, url));
        }
        Ok(Targets { routes })
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The URL for `ns`: an exact pattern beats a prefix, a longer prefix a
    /// shorter one, and `*` comes last.
    pub fn target(&self, ns: &str) -> Option<&url::Url> {
        let rank = |pattern: &NamespacePattern| match pattern {
            NamespacePattern::Exact(_) => usize::MAX,
            NamespacePattern::Prefix(prefix) => 1 + prefix.len(),
            NamespacePattern::Any => 0,
        };
        self.routes
            .iter()
            .filter(|(pattern, _)| pattern.matches(ns))
            .max_by_key(|(pattern, _)| rank(pattern))
            .map(|(_, url)| url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_specific_pattern_wins() {
        let targets =
            Targets::parse("*=http://any/x; carts=https://carts/a;\ncart*=http://prefix/p").expect("valid targets");
        assert_eq!(targets.target("carts").unwrap().as_str(), "https://carts/a");
        assert_eq!(targets.target("cartsy").unwrap().as_str(), "http://prefix/p");
        assert_eq!(targets.target("orders").unwrap().as_str(), "http://any/x");
        let only = Targets::parse("carts=http://a/").unwrap();
        assert!(only.target("orders").is_none());
        assert!(Targets::parse("carts=ftp://a/").is_err());
        assert!(Targets::parse("carts").is_err());
        assert!(Targets::parse("Bad!=http://a/").is_err());
        assert!(Targets::parse("").unwrap().is_empty());
    }
}
