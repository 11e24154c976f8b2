//! The TOML file named by `--config`: the lowest-precedence source, under
//! flags and `MESHCA_*` environment variables. Its keys are the settings'
//! names; an unknown key is an error naming it.
//!
//! Must not: apply defaults or validate values (see `resolve`).

use super::args::ServeArgs;
use super::ConfigError;

macro_rules! merge_fields {
    ($hi:expr, $lo:expr; $($f:ident),* $(,)?) => {
        ServeArgs { config: $hi.config.clone(), $($f: $hi.$f.clone().or_else(|| $lo.$f.clone()),)* }
    };
}

impl ServeArgs {
    /// Fills unset fields from the TOML file named by `--config`, if any.
    pub fn with_file(self) -> Result<Self, ConfigError> {
        let Some(path) = &self.config else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let file: ServeArgs = toml::from_str(&text).map_err(|e| ConfigError::File {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(merge_fields!(self, file;
            data_dir, listen, admin_listen, trust_domain, control_plane_namespace,
            server_dns_names, default_ttl, max_ttl, min_ttl, native_audience,
            jwt_svid_key_type, jwt_svid_default_ttl, jwt_svid_max_ttl,
            linkerd_audience, istio_audience, jwks_file, jwks_url, oidc_issuer_url,
            jwks_ca_file, jwks_refresh_interval, jwt_issuers, kubeconfig,
            tokenreview_qps, tokenreview_burst, authn_order, allow_legacy_tokens,
            rate_limit, rate_burst, audit_log, audit_checkpoint_interval, log_format,
            audit_refusal_rate, audit_refusal_burst, audit_refusal_window, admin_allowed_hosts,
            audit_max_bytes,
            issuer_lifetime, root_lifetime, propagation_wait, auto_rotate_root_every,
            expiry_warning, rotation_check_interval, bundle_file, init_root_cert, init_root_key,
            publish_bundle, bundle_namespace_selector, bundle_resync_interval, jwks_kubernetes,
            leader_election_lease, leader_election_lease_duration, replica_name, state_secret,
            state_poll_interval, watch_idle_timeout, kubernetes, audit_key_secret, issuer_secret,
            propagation_report_interval, watch_token_bindings,
            identity_rate_limit, identity_rate_burst, watch_stall_timeout,
            watch_anonymous_per_ip, watch_anonymous_max, grpc_max_connections,
            grpc_max_concurrent_streams, grpc_handshake_timeout, grpc_keepalive_interval,
            grpc_keepalive_timeout, grpc_idle_timeout, grpc_max_header_bytes, renewal_max_age,
            federation_listen, federation_profile, federation_cert_file, federation_key_file,
            federation_path, federation_refresh_hint, federate_with,
        ))
    }
}
