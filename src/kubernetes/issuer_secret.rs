//! The issuer as a `kubernetes.io/tls` Secret, both ways.
//!
//! Owns: keeping one Secret (`tls.crt` the issuer certificate, `tls.key`
//! its key, `ca.crt` the active root — the layout cert-manager and Linkerd's
//! `linkerd-identity-issuer` use) in step with the CA's issuer, on the
//! leader. Out: when meshca's issuer changes (renewal, rotation) the Secret
//! is rewritten, with a resourceVersion precondition. In: when someone else
//! writes a newer issuer there (an operator's `kubectl apply`,
//! cert-manager renewing a Certificate), it is checked (a CA certificate,
//! valid now, the key matches, signed by the active root) and installed as
//! every replica's issuer through the shared state; one that fails is
//! refused with a Kubernetes Event and a log line, and the last good issuer
//! stays. Which side wrote the Secret is told by the
//! `meshca.io/issuer-fingerprint` annotation meshca sets on its own writes.
//! meshca writes with server-side apply (field manager `meshca`, forced,
//! with the resourceVersion it read as a precondition) and owns only its
//! three data keys, `type`, its label and its annotation: cert-manager's
//! `cert-manager.io/*` annotations and anything else others set stay. An
//! existing Secret of another type (`type` is immutable) is reported once —
//! log, Event, `meshca_kubernetes_secrets_refused_total{secret="issuer"}` —
//! and left alone until someone deletes it.
//! Must not: decide rotation steps or renew the issuer itself.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio::sync::{watch, Notify};
use x509_parser::prelude::*;

use crate::trust::service::RotationService;
use crate::util::secret::SecretBytes;

use super::error::{kube_err, Error};

/// The annotation naming the issuer meshca last wrote.
pub(crate) const ANNOTATION: &str = "meshca.io/issuer-fingerprint";

/// What one reconciliation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The Secret already holds the current issuer.
    Unchanged,
    /// The Secret was created or rewritten with meshca's issuer.
    Written,
    /// A newer issuer written by someone else was installed.
    Installed(String),
    /// A foreign issuer was refused (why).
    Refused(String),
    /// The Secret exists with another type than `kubernetes.io/tls` (the
    /// type it has); `type` is immutable, so meshca cannot write it.
    WrongType(String),
}

/// The type meshca writes.
const TLS: &str = "kubernetes.io/tls";

/// What to tell an operator about a Secret of the wrong type.
pub(crate) fn wrong_type_message(s: &Settings, found: &str) -> String {
    format!(
        "Secret {}/{} has type {found}; meshca writes {TLS} and `type` is immutable: delete it and meshca recreates it",
        s.namespace, s.name
    )
}

/// A 422 about the Secret's `type` (it changed between read and write).
fn is_type_refusal(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(st) if st.code == 422
        && st.details.as_ref().is_some_and(|d| d.causes.iter().any(|c| c.field == "type")))
}

/// The Secret and where it lives.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// The CA's namespace.
    pub namespace: String,
    /// The Secret's name.
    pub name: String,
    /// This replica (for Events).
    pub replica: String,
    /// How the Secret's watch is paced.
    pub watch: super::watch::Pacing,
}

fn desired(s: &Settings, files: &crate::trust::manager::IssuerFiles, rv: Option<String>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(s.name.clone()),
            namespace: Some(s.namespace.clone()),
            resource_version: rv,
            labels: Some(super::managed_by()),
            annotations: Some(
                [(ANNOTATION.to_string(), files.fingerprint.clone())]
                    .into_iter()
                    .collect(),
            ),
            ..Default::default()
        },
        type_: Some(TLS.into()),
        data: Some(BTreeMap::from([
            ("tls.crt".to_string(), ByteString(files.cert_pem.clone())),
            (
                "tls.key".to_string(),
                ByteString(files.key_pem.expose().to_vec()),
            ),
            (
                "ca.crt".to_string(),
                ByteString(files.root_pem.as_bytes().to_vec()),
            ),
        ])),
        ..Default::default()
    }
}

/// The first certificate of `tls.crt`: fingerprint and notBefore.
fn leaf(pem: &[u8]) -> Result<(String, std::time::SystemTime), String> {
    let der = crate::ca::pem_to_certs(pem)?
        .into_iter()
        .next()
        .ok_or("tls.crt holds no certificate")?;
    let (_, c) = X509Certificate::from_der(&der).map_err(|e| format!("tls.crt: {e}"))?;
    Ok((
        crate::ca::fingerprint(&der),
        crate::ca::to_system_time(c.validity().not_before),
    ))
}

/// Foreign issuers already dealt with: their fingerprint → the issuer
/// meshca had right after (the foreign one itself when installed; the
/// unchanged current one when refused). Once meshca's issuer moves on from
/// that, the Secret is stale and is rewritten; until then a refused
/// certificate is left in place for its owner to see and fix.
pub(crate) type Handled = std::collections::HashMap<String, String>;

/// One reconciliation of the Secret with the CA's issuer.
pub(crate) async fn reconcile(
    api: &Api<Secret>,
    s: &Settings,
    rotation: &RotationService,
    handled: &mut Handled,
) -> Result<Outcome, Error> {
    let mgr = rotation.manager().clone();
    let what = |verb: &str| format!("{verb} Secret {}/{}", s.namespace, s.name);
    let files = tokio::task::spawn_blocking(move || mgr.issuer_files())
        .await
        .map_err(|e| Error::invalid("the local issuer", e))?
        .map_err(|e| Error::invalid("the local issuer", e))?;
    let write = |rv: Option<String>| super::KeySecret(desired(s, &files, rv));
    let Some(cur) = api
        .get_opt(&s.name)
        .await
        .map_err(kube_err(what("reading")))?
    else {
        return match api.create(&PostParams::default(), &write(None).0).await {
            Ok(created) => {
                drop(super::KeySecret(created));
                Ok(Outcome::Written)
            }
            // Someone created it meanwhile: the next event looks at theirs.
            Err(e) => match Error::from_kube(what("creating"), e) {
                e if e.is_conflict() => Ok(Outcome::Unchanged),
                e => Err(e),
            },
        };
    };
    // Wiped on every return path.
    let cur = super::KeySecret(cur);
    let found = cur.0.type_.clone().unwrap_or_else(|| "Opaque".into());
    if found != TLS {
        return Ok(Outcome::WrongType(found));
    }
    let data = cur.0.data.as_ref().cloned().unwrap_or_default();
    let data = super::KeySecret(Secret {
        data: Some(data),
        ..Default::default()
    });
    let data = data.0.data.as_ref().expect("set above");
    let ours_written = cur
        .0
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION))
        .cloned();
    let rv = cur.0.metadata.resource_version.clone();
    let theirs = data
        .get("tls.crt")
        .ok_or_else(|| "tls.crt is missing".to_string())
        .and_then(|c| leaf(&c.0));
    // Server-side apply of meshca's fields only, based on what was read.
    let overwrite = || async {
        let pp = PatchParams::apply(super::FIELD_MANAGER).force();
        match api
            .patch(&s.name, &pp, &Patch::Apply(&write(rv.clone()).0))
            .await
        {
            Ok(written) => {
                drop(super::KeySecret(written));
                Ok(Outcome::Written)
            }
            Err(e) if is_type_refusal(&e) => Ok(Outcome::WrongType(format!("other than {TLS}"))),
            // Changed meanwhile: the watch event brings the new content.
            Err(e) => match Error::from_kube(what("updating"), e) {
                e if e.is_conflict() => Ok(Outcome::Unchanged),
                e => Err(e),
            },
        }
    };
    let (fp, not_before) = match theirs {
        Ok(x) => x,
        Err(e) => return Ok(Outcome::Refused(e)),
    };
    let by_meshca = ours_written.as_deref() == Some(fp.as_str());
    if fp == files.fingerprint {
        if !by_meshca {
            // The current issuer came from outside (installed by a previous
            // leader): leave its renewal to its owner.
            rotation.mark_external_issuer(&fp);
        }
        return Ok(Outcome::Unchanged);
    }
    if let Some(after) = handled.get(&fp) {
        if *after == files.fingerprint {
            return Ok(Outcome::Unchanged);
        }
        // Dealt with, and meshca's issuer has changed since: stale.
        return overwrite().await;
    }
    if by_meshca || not_before < files.not_before {
        // Our own older issuer, or an older foreign one: ours is current.
        return overwrite().await;
    }
    let Some(key) = data.get("tls.key") else {
        return Ok(Outcome::Refused("tls.key is missing".into()));
    };
    let source = format!("Secret {}/{}", s.namespace, s.name);
    match rotation
        .install_issuer(
            data["tls.crt"].0.clone(),
            SecretBytes::new(key.0.clone()),
            &source,
        )
        .await
    {
        Ok(installed) => {
            handled.insert(fp, installed.clone());
            Ok(Outcome::Installed(installed))
        }
        Err(e) => {
            handled.insert(fp, files.fingerprint.clone());
            Ok(Outcome::Refused(e))
        }
    }
}

/// Says what a reconciliation did: a refusal or a Secret of the wrong type
/// as an error log line, an Event and a metric, once until it changes.
async fn tell(
    client: &kube::Client,
    s: &Settings,
    rotation: &RotationService,
    r: Result<Outcome, Error>,
    reported: &mut Option<String>,
) {
    let (reason, msg) = match r {
        Ok(Outcome::Refused(why)) => (
            "InvalidIssuer",
            format!(
                "refused the issuer in Secret {}/{}: {why}; keeping the current issuer",
                s.namespace, s.name
            ),
        ),
        Ok(Outcome::WrongType(found)) => ("WrongSecretType", wrong_type_message(s, &found)),
        Ok(o) => {
            match o {
                Outcome::Written => {
                    tracing::info!(secret = %s.name, "issuer written to its kubernetes.io/tls Secret")
                }
                Outcome::Installed(fp) => {
                    tracing::info!(secret = %s.name, issuer = %fp, "issuer installed from its kubernetes.io/tls Secret")
                }
                _ => {}
            }
            // In order again: a later refusal is news.
            *reported = None;
            return;
        }
        Err(e) => {
            tracing::warn!(secret = %s.name, error = %e, "issuer Secret: reconcile failed");
            return;
        }
    };
    if reported.as_deref() == Some(msg.as_str()) {
        return;
    }
    tracing::error!(secret = %s.name, reason, error = %msg, "issuer Secret refused");
    rotation.metrics().secret_refused("issuer");
    super::event::warn_secret(
        client.clone(),
        &s.namespace,
        &s.name,
        &s.replica,
        reason,
        &msg,
    )
    .await;
    *reported = Some(msg);
}

/// Keeps the Secret and the issuer in step while this replica leads (or
/// always, without leader election), until `stop` flips.
pub(crate) async fn run(
    client: kube::Client,
    s: Settings,
    rotation: Arc<RotationService>,
    mut leader: Option<watch::Receiver<bool>>,
    mut stop: watch::Receiver<bool>,
) {
    let api: Api<Secret> = Api::namespaced(client.clone(), &s.namespace);
    let wake = Arc::new(Notify::new());
    let ns = s.namespace.clone();
    tokio::spawn(super::watch::follow::<Secret>(
        client.clone(),
        move |c| Api::namespaced(c, &ns),
        super::watch::Target {
            resource: "secrets",
            name: Some(s.name.clone()),
            labels: None,
            pacing: s.watch,
        },
        wake.clone(),
        stop.clone(),
        rotation.metrics().clone(),
    ));
    let mut handled = Handled::new();
    // A refused or unwritable Secret is reported once, not at every wake-up.
    let mut reported: Option<String> = None;
    loop {
        let leads = leader.as_mut().is_none_or(|l| *l.borrow_and_update());
        if leads {
            let r = reconcile(&api, &s, &rotation, &mut handled).await;
            tell(&client, &s, &rotation, r, &mut reported).await;
        }
        let leader_changed = async {
            match leader.as_mut() {
                Some(l) => l.changed().await.is_err(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = wake.notified() => {}
            _ = rotation.issuer_changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
            gone = leader_changed => if gone { return },
            _ = stop.changed() => return,
        }
    }
}
