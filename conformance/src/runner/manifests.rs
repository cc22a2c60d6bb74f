//! Kubernetes manifests as loose objects: read once per file, `{GATEWAY_CLASS_NAME}` filled in, and merged per
//! test the way `kubectl apply` would (a later object with the same kind, namespace and name replaces the
//! earlier one).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// The GatewayClass this implementation answers to.
pub const GATEWAY_CLASS_NAME: &str = "waypoint";
const GATEWAY_CLASS_PLACEHOLDER: &str = "{GATEWAY_CLASS_NAME}";

#[derive(Debug, Clone, thiserror::Error)]
pub enum ManifestError {
    #[error("reading manifest {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("manifest {path}: invalid YAML: {reason}")]
    Yaml { path: PathBuf, reason: String },
    #[error("manifest {path}: document {document} has no {field}")]
    Incomplete {
        path: PathBuf,
        document: usize,
        field: &'static str,
    },
}

/// One Kubernetes object.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub api_version: String,
    pub kind: String,
    /// `default` when the manifest gives none; empty for cluster-scoped kinds.
    pub namespace: String,
    pub name: String,
    pub value: Value,
}

impl Object {
    fn from_value(value: Value) -> Result<Object, &'static str> {
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
        let api_version = text(value.get("apiVersion")).ok_or("apiVersion")?;
        let kind = text(value.get("kind")).ok_or("kind")?;
        let metadata = value.get("metadata");
        let name = text(metadata.and_then(|m| m.get("name"))).ok_or("metadata.name")?;
        let namespace = if is_cluster_scoped(&kind) {
            String::new()
        } else {
            text(metadata.and_then(|m| m.get("namespace"))).unwrap_or_else(|| "default".into())
        };
        Ok(Object {
            api_version,
            kind,
            namespace,
            name,
            value,
        })
    }

    /// API group (`""` for core).
    pub fn group(&self) -> &str {
        self.api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("")
    }

    pub fn is(&self, group: &str, kind: &str) -> bool {
        self.group() == group && self.kind == kind
    }

    pub fn key(&self) -> String {
        format!("{}/{} {}/{}", self.group(), self.kind, self.namespace, self.name)
    }

    pub fn labels(&self) -> std::collections::BTreeMap<String, String> {
        string_map(self.value.pointer("/metadata/labels"))
    }
}

fn is_cluster_scoped(kind: &str) -> bool {
    matches!(
        kind,
        "Namespace" | "GatewayClass" | "ClusterRole" | "ClusterRoleBinding" | "CustomResourceDefinition"
    )
}

/// A `{string: string}` map from a JSON value; anything else is ignored.
pub fn string_map(value: Option<&Value>) -> std::collections::BTreeMap<String, String> {
    value
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// Parses a manifest file's text.
pub fn parse(path: &Path, text: &str) -> Result<Vec<Object>, ManifestError> {
    let text = text.replace(GATEWAY_CLASS_PLACEHOLDER, GATEWAY_CLASS_NAME);
    let documents: Vec<Value> = serde_saphyr::from_multiple(&text).map_err(|e| ManifestError::Yaml {
        path: path.to_path_buf(),
        reason: e.to_string().lines().next().unwrap_or_default().to_string(),
    })?;
    documents
        .into_iter()
        .enumerate()
        .filter(|(_, v)| !v.is_null())
        .map(|(i, v)| {
            Object::from_value(v).map_err(|field| ManifestError::Incomplete {
                path: path.to_path_buf(),
                document: i + 1,
                field,
            })
        })
        .collect()
}

/// Manifest files read so far, keyed by their path relative to the manifests directories.
#[derive(Debug)]
pub struct ManifestCache {
    /// Lookup order: the first directory holding a relative path serves it.
    dirs: Vec<PathBuf>,
    files: HashMap<String, Result<Vec<Object>, ManifestError>>,
}

impl ManifestCache {
    pub fn new(dir: &Path) -> ManifestCache {
        ManifestCache::with_dirs(&[dir.to_path_buf()])
    }

    pub fn with_dirs(dirs: &[PathBuf]) -> ManifestCache {
        ManifestCache {
            dirs: dirs.to_vec(),
            files: HashMap::new(),
        }
    }

    /// Where `relative` is read from: the first directory that has it (the first directory when none has,
    /// so the error names a path).
    fn locate(&self, relative: &str) -> PathBuf {
        let candidates = self.dirs.iter().map(|dir| dir.join(relative));
        candidates
            .clone()
            .find(|path| path.is_file())
            .or_else(|| candidates.into_iter().next())
            .unwrap_or_else(|| PathBuf::from(relative))
    }

    pub fn file(&mut self, relative: &str) -> Result<&[Object], ManifestError> {
        let path = self.locate(relative);
        let entry = self.files.entry(relative.to_string()).or_insert_with(|| {
            let text = std::fs::read_to_string(&path).map_err(|e| ManifestError::Read {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            parse(&path, &text)
        });
        match entry {
            Ok(objects) => Ok(objects),
            Err(e) => Err(e.clone()),
        }
    }

    /// The objects of `manifests` in order; a later object replaces an earlier one with the same key.
    pub fn merged(&mut self, manifests: &[String]) -> Result<Vec<Object>, ManifestError> {
        let mut out: Vec<Object> = Vec::new();
        for relative in manifests {
            for object in self.file(relative)? {
                match out.iter_mut().find(|o| o.key() == object.key()) {
                    Some(existing) => *existing = object.clone(),
                    None => out.push(object.clone()),
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn documents_placeholders_and_defaults() {
        let text = "---\n# comment only\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns1\n  labels: {a: b}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  gatewayClassName: \"{GATEWAY_CLASS_NAME}\"\n---\n";
        let objects = parse(Path::new("m.yaml"), text).unwrap();
        assert_eq!(objects.len(), 2);
        assert_eq!(objects[0].namespace, "");
        assert_eq!(objects[0].labels()["a"], "b");
        assert!(objects[1].is("gateway.networking.k8s.io", "Gateway"));
        assert_eq!(objects[1].namespace, "default");
        assert_eq!(objects[1].value["spec"]["gatewayClassName"], "waypoint");
        let err = parse(Path::new("m.yaml"), "apiVersion: v1\nmetadata: {name: x}\n").unwrap_err();
        assert!(err.to_string().contains("no kind"), "{err}");
    }

    #[test]
    fn later_manifests_replace_objects_with_the_same_key() {
        let dir = std::env::temp_dir().join(format!("wp-manifests-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("a.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: n}\nspec: {v: 1}\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("b.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: n}\nspec: {v: 2}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: t, namespace: n}\n",
        )
        .unwrap();
        let mut cache = ManifestCache::new(&dir);
        let merged = cache.merged(&["a.yaml".into(), "b.yaml".into()]).unwrap();
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].value["spec"]["v"], 2);
        assert!(cache.merged(&["missing.yaml".into()]).is_err());

        // A second directory: its files are found, and the first directory wins where both have a path.
        let own = dir.join("own");
        std::fs::create_dir_all(own.join("sub")).unwrap();
        std::fs::write(
            own.join("a.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: n}\nspec: {v: 3}\n",
        )
        .unwrap();
        std::fs::write(
            own.join("sub/c.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: c, namespace: n}\n",
        )
        .unwrap();
        let mut cache = ManifestCache::with_dirs(&[own.clone(), dir.clone()]);
        let merged = cache
            .merged(&["b.yaml".into(), "a.yaml".into(), "sub/c.yaml".into()])
            .unwrap();
        assert_eq!(merged.len(), 3);
        assert_eq!(merged[0].value["spec"]["v"], 3, "own a.yaml replaced b.yaml's s");
        assert_eq!(merged[2].name, "c");
        let err = cache.merged(&["nowhere.yaml".into()]).unwrap_err();
        assert!(err.to_string().contains("own/nowhere.yaml"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
