//! The organism's public API as one OpenAPI 3 document, composed from the roles' own
//! descriptions (`api::ApiDoc`: search, crawl, stats; `healthchecker::ApiDoc`: cells, events),
//! which utoipa generates from the handlers' annotations and the wire types: a route or an
//! answer that changes changes the document. Every cell this binary runs serves it at
//! `/openapi.json` (a front door answers it itself).

use utoipa::OpenApi as _;

/// The document.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = api::ApiDoc::openapi();
    doc.merge(healthchecker::ApiDoc::openapi());
    doc.info.title = "Homeostat".into();
    doc.info.description = Some(
        "A search crawler that runs itself. Search, crawl and stats are served by the api \
         cells through the front doors; cells and events by the health checkers."
            .into(),
    );
    doc.info.version = env!("CARGO_PKG_VERSION").into();
    doc
}

/// Publish the document for `/openapi.json`.
pub fn publish() {
    match serde_json::to_value(document()) {
        Ok(doc) => vitals::publish_openapi(doc),
        Err(e) => tracing::error!(error = %e, "the OpenAPI description does not serialize"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The routes the document describes, as (METHOD, path).
    fn described() -> std::collections::BTreeSet<(String, String)> {
        let doc = serde_json::to_value(document()).expect("serializes");
        let mut out = std::collections::BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("path item").keys() {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
        out
    }

    #[test]
    fn the_document_describes_the_front_doors_public_routes_and_the_registry_reads() {
        let mut expected = std::collections::BTreeSet::new();
        for (path, methods) in frontdoor::paths::PUBLIC_ROUTES {
            for m in methods {
                // HEAD is GET without a body: OpenAPI describes the GET.
                if m.as_str() != "HEAD" {
                    expected.insert((m.to_string(), path.to_string()));
                }
            }
        }
        expected.insert(("GET".into(), "/cells".into()));
        expected.insert(("GET".into(), "/events".into()));
        assert_eq!(described(), expected);
        let doc = serde_json::to_value(document()).expect("serializes");
        assert_eq!(doc["openapi"], "3.1.0");
        for schema in [
            "SearchResponse",
            "CrawlRequest",
            "CrawlAccepted",
            "Stats",
            "CellEvent",
            "CellRecord",
        ] {
            assert!(
                doc["components"]["schemas"][schema].is_object(),
                "{schema} is described: {}",
                doc["components"]["schemas"]
            );
        }
    }
}
