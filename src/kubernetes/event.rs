//! Kubernetes Events about meshca's objects.
//!
//! Owns: recording one Warning Event about an object in the CA's namespace,
//! so `kubectl describe` and `kubectl get events` show why meshca refused
//! it. Failing to record is logged, never fatal. Must not: decide anything.

use k8s_openapi::api::core::v1::{Event, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, PostParams};

/// Records a Warning Event about Secret `name` in `namespace`.
pub(crate) async fn warn_secret(
    client: kube::Client,
    namespace: &str,
    name: &str,
    replica: &str,
    reason: &str,
    message: &str,
) {
    let api: Api<Event> = Api::namespaced(client, namespace);
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let ev = Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{name}.")),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            kind: Some("Secret".into()),
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            api_version: Some("v1".into()),
            ..Default::default()
        },
        reason: Some(reason.into()),
        // The API server limits messages to 1 KiB.
        message: Some(message.chars().take(1000).collect()),
        type_: Some("Warning".into()),
        reporting_component: Some("meshca".into()),
        reporting_instance: Some(replica.into()),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        ..Default::default()
    };
    if let Err(e) = api.create(&PostParams::default(), &ev).await {
        tracing::warn!(error = %e, "could not record a Kubernetes Event");
    }
}
