//! The CRDs this operator serves, rendered as the YAML kept in `crds/`.

use crac_api::{CracApp, CracScalePolicy};
use kube::CustomResourceExt;

/// All CRDs as one multi-document YAML stream.
pub fn render() -> String {
    let crds = [CracApp::crd(), CracScalePolicy::crd()];
    crds.iter()
        .map(|crd| {
            let yaml = yaml_serde::to_string(crd).expect("a CRD always serializes");
            format!("---\n{yaml}")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn crds_directory_is_up_to_date() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../crds/crds.yaml");
        let committed = std::fs::read_to_string(path).expect("crds/crds.yaml exists");
        assert!(
            committed == super::render(),
            "crds/crds.yaml is stale: run `make crds` and commit the result"
        );
    }

    /// The formats kube-apiserver knows (k8s.io/kube-openapi's strfmt registry); any other
    /// makes `kubectl apply` and `helm install` print a warning for every CRD applied.
    const KNOWN_FORMATS: [&str; 30] = [
        "bsonobjectid",
        "uri",
        "email",
        "hostname",
        "ipv4",
        "ipv6",
        "cidr",
        "mac",
        "uuid",
        "uuid3",
        "uuid4",
        "uuid5",
        "isbn",
        "isbn10",
        "isbn13",
        "creditcard",
        "ssn",
        "hexcolor",
        "rgbcolor",
        "byte",
        "password",
        "date",
        "duration",
        "datetime",
        "date-time",
        "int32",
        "int64",
        "float",
        "double",
        "string",
    ];

    #[test]
    fn crds_use_only_formats_the_api_server_knows() {
        let unknown: Vec<_> = super::render()
            .lines()
            .filter_map(|l| l.trim().strip_prefix("format: "))
            .filter(|f| !KNOWN_FORMATS.contains(f))
            .map(str::to_string)
            .collect();
        assert!(
            unknown.is_empty(),
            "formats the API server warns about: {unknown:?}"
        );
    }
}

/// `docs/reference.md`: every field of the CRDs with its type, default, validation and
/// description, from the same schema the API server enforces.
pub fn render_reference() -> String {
    let mut out = String::from(
        "# API reference\n\nGenerated from the CRD schemas by `make crds` (`crdgen --reference`); \
         do not edit by hand.\n",
    );
    for crd in [CracApp::crd(), CracScalePolicy::crd()] {
        let version = &crd.spec.versions[0];
        out.push_str(&format!(
            "\n## {} ({}/{}, {})\n",
            crd.spec.names.kind, crd.spec.group, version.name, crd.spec.scope
        ));
        let schema = version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .map(|s| serde_json::to_value(s).expect("schemas serialize"))
            .unwrap_or_default();
        if let Some(rules) = schema.get("x-kubernetes-validations") {
            for rule in rules.as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "\nRule on the object: `{}` ({})\n",
                    rule["rule"].as_str().unwrap_or(""),
                    rule["message"].as_str().unwrap_or("")
                ));
            }
        }
        out.push_str("\n| field | type | default | validation | description |\n| --- | --- | --- | --- | --- |\n");
        for part in ["spec", "status"] {
            if let Some(s) = schema.pointer(&format!("/properties/{part}")) {
                fields(&mut out, part, s, 0);
            }
        }
    }
    out
}

/// One table row per field, depth first. The pod template is Kubernetes' own: not expanded.
fn fields(out: &mut String, path: &str, schema: &serde_json::Value, depth: usize) {
    let type_ =
        schema["type"]
            .as_str()
            .unwrap_or(if schema.get("x-kubernetes-int-or-string").is_some() {
                "int-or-string"
            } else {
                "object"
            });
    let items = schema.get("items");
    let type_ = match (type_, items.and_then(|i| i["type"].as_str())) {
        ("array", Some(inner)) => format!("[]{inner}"),
        (t, _) => t.to_string(),
    };
    let default = schema
        .get("default")
        .map(|d| format!("`{d}`"))
        .unwrap_or_default();
    let mut checks = Vec::new();
    for key in [
        "pattern",
        "minimum",
        "maximum",
        "maxItems",
        "maxLength",
        "minLength",
        "enum",
    ] {
        if let Some(v) = schema.get(key) {
            checks.push(format!("{key} `{v}`"));
        }
    }
    for rule in schema["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        checks.push(format!("`{}`", rule["rule"].as_str().unwrap_or("")));
    }
    let description = schema["description"]
        .as_str()
        .unwrap_or("")
        .replace('\n', " ")
        .replace('|', "\\|");
    out.push_str(&format!(
        "| `{path}` | {type_} | {default} | {} | {description} |\n",
        checks.join("; ").replace('|', "\\|")
    ));
    if path.ends_with(".template") || depth > 6 {
        return;
    }
    let children = schema
        .get("properties")
        .or_else(|| items.and_then(|i| i.get("properties")));
    if let Some(props) = children.and_then(|p| p.as_object()) {
        let prefix = if items.is_some() {
            format!("{path}[]")
        } else {
            path.to_string()
        };
        for (name, child) in props {
            fields(out, &format!("{prefix}.{name}"), child, depth + 1);
        }
    }
}

#[cfg(test)]
mod reference_tests {
    #[test]
    fn reference_doc_is_up_to_date() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/reference.md");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == super::render_reference(),
            "docs/reference.md is stale: run `make crds` and commit the result"
        );
    }
}
