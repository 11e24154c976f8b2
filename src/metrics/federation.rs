//! Federation: when each followed trust domain's bundle was last refreshed,
//! and refresh failures by reason.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::Metrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DomainLabel {
    trust_domain: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    trust_domain: String,
    reason: &'static str,
}

/// The followers' instruments.
#[derive(Default)]
pub(super) struct FederationMetrics {
    last_refresh: Family<DomainLabel, Gauge>,
    failures: Family<FailureLabels, Counter>,
}

impl FederationMetrics {
    pub(super) fn register(r: &mut Registry) -> Self {
        let m = Self::default();
        r.register(
            "federation_last_refresh_timestamp_seconds",
            "Unix time of the last successful refresh of a followed trust domain's bundle",
            m.last_refresh.clone(),
        );
        r.register(
            "federation_refresh_failures",
            "Failed refreshes of a followed trust domain's bundle, by reason (connect, tls, timeout, http_status, too_large, malformed, wrong_trust_domain, sequence_regressed, setup)",
            m.failures.clone(),
        );
        m
    }
}

impl Metrics {
    /// A followed domain's bundle was fetched and accepted at `unix` seconds.
    pub(crate) fn federation_refreshed(&self, trust_domain: &str, unix: u64) {
        self.federation
            .last_refresh
            .get_or_create(&DomainLabel {
                trust_domain: trust_domain.to_string(),
            })
            .set(i64::try_from(unix).unwrap_or(i64::MAX));
    }

    /// A refresh of a followed domain failed.
    pub(crate) fn federation_refresh_failed(&self, trust_domain: &str, reason: &'static str) {
        self.federation
            .failures
            .get_or_create(&FailureLabels {
                trust_domain: trust_domain.to_string(),
                reason,
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    /// The values recorded are the values exposed, under their names.
    #[test]
    fn records_refresh_times_and_failures_per_domain() {
        let m = super::Metrics::new();
        m.federation_refreshed("b.example", 1_800_000_000);
        m.federation_refresh_failed("b.example", "tls");
        m.federation_refresh_failed("b.example", "tls");
        let out = m.render();
        assert!(out.contains("meshca_federation_last_refresh_timestamp_seconds{trust_domain=\"b.example\"} 1800000000\n"), "{out}");
        assert!(out.contains("meshca_federation_refresh_failures_total{trust_domain=\"b.example\",reason=\"tls\"} 2\n"), "{out}");
    }
}
