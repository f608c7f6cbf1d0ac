//! Answers to repeated searches, kept while the index has not changed.
//!
//! Queries follow a Zipf law: a few words are asked most of the time, and a common word matches
//! most pages, which is the costly search (its posting list walked for the total, its newest
//! candidates ranked). An answer is kept under the store's search generation, read before the
//! search ([`engines::Store::search_generation`]: a token any commit by any cell changes), and
//! given again only while the generation is the same, so a kept answer is never older than the
//! index: a page ingested by any api is found by the next search. During a crawl the generation
//! moves with every batch and little is kept; on a settled index every repeated question is
//! answered from memory. Bounded by bytes (`[api] search_cache_mb`), least recently and least
//! frequently used out first (moka's TinyLFU).

use std::sync::Arc;

use engines::{SearchQuery, SearchResults, Store};

/// Answers kept per question; see the module's description.
pub struct SearchCache {
    kept: Option<moka::sync::Cache<Key, Arc<Kept>>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    terms: Vec<String>,
    limit: u32,
    offset: u64,
}

struct Kept {
    generation: String,
    results: SearchResults,
}

/// Whether an answer came from memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Kept,
    Searched,
}

impl SearchCache {
    /// Keep at most `bytes` of answers (about: URLs, titles and snippets); 0 keeps none.
    pub fn new(bytes: u64) -> Self {
        let kept = (bytes > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(bytes)
                .weigher(|k: &Key, v: &Arc<Kept>| weight(k, v))
                .build()
        });
        Self { kept }
    }

    /// `query`'s answer: kept, or searched (and kept) when the index changed since or it was
    /// never asked. A generation the store cannot read costs the keeping, not the search.
    pub async fn search(
        &self,
        store: &dyn Store,
        query: &SearchQuery,
    ) -> engines::Result<(SearchResults, Outcome)> {
        let Some(kept) = &self.kept else {
            return Ok((store.search(query).await?, Outcome::Searched));
        };
        let generation = match store.search_generation().await {
            Ok(Some(g)) => g,
            Ok(None) => return Ok((store.search(query).await?, Outcome::Searched)),
            Err(e) => {
                tracing::debug!(error = %e, "reading the search generation failed; not kept");
                return Ok((store.search(query).await?, Outcome::Searched));
            }
        };
        let key = Key {
            terms: query.terms.clone(),
            limit: query.limit,
            offset: query.offset,
        };
        if let Some(k) = kept.get(&key) {
            if k.generation == generation {
                return Ok((k.results.clone(), Outcome::Kept));
            }
        }
        let results = store.search(query).await?;
        kept.insert(
            key,
            Arc::new(Kept {
                generation,
                results: results.clone(),
            }),
        );
        Ok((results, Outcome::Searched))
    }

    /// Run pending evictions now (for tests that look at the size).
    #[cfg(test)]
    fn settle(&self) -> u64 {
        self.kept.as_ref().map_or(0, |k| {
            k.run_pending_tasks();
            k.weighted_size()
        })
    }
}

/// About the bytes an answer holds.
fn weight(k: &Key, v: &Kept) -> u32 {
    let hits: usize = v
        .results
        .hits
        .iter()
        .map(|h| h.url.len() + h.title.len() + h.snippet.len() + 64)
        .sum();
    let terms: usize = k.terms.iter().map(|t| t.len() + 24).sum();
    (hits + terms + v.generation.len() + 96).min(u32::MAX as usize) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use engines::frontier::Links;
    use engines::sqlite::SqliteStore;
    use engines::{Candidate, CrawlSpec, IngestItem, IngestOutcome};

    const UNLIMITED: CrawlSpec = CrawlSpec {
        max_depth: None,
        max_pages: None,
    };

    fn seed(url: &str) -> Candidate {
        Candidate {
            url: url.into(),
            host: "x.test".into(),
        }
    }

    fn page(url: &str, body: &str) -> IngestItem {
        IngestItem {
            url: url.into(),
            outcome: IngestOutcome::Page {
                final_url: url.into(),
                final_host: "x.test".into(),
                title: "title".into(),
                text: body.into(),
                indexable: true,
                links: Vec::new(),
            },
        }
    }

    async fn store(dir: &std::path::Path) -> SqliteStore {
        SqliteStore::open(dir.join("s.db").to_str().expect("utf-8"))
            .await
            .expect("open")
    }

    fn query(word: &str) -> SearchQuery {
        SearchQuery {
            terms: vec![word.into()],
            limit: 10,
            offset: 0,
        }
    }

    /// A repeated question is answered from memory until any cell (here another connection to
    /// the same file, as another api would be) commits; then the new page is found at once.
    #[tokio::test]
    async fn a_kept_answer_lasts_until_the_index_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (store(dir.path()).await, store(dir.path()).await);
        let crawl = a.create_crawl(UNLIMITED).await.expect("crawl");
        let seeds = [seed("http://x.test/1"), seed("http://x.test/2")];
        a.admit_seeds(crawl, &seeds, u64::MAX).await.expect("admit");
        a.ingest(&[page("http://x.test/1", "zebra")], u64::MAX, Links::Admit)
            .await
            .expect("ingest");
        let cache = SearchCache::new(1 << 20);
        let (first, o1) = cache.search(&a, &query("zebra")).await.expect("search");
        let (again, o2) = cache.search(&a, &query("zebra")).await.expect("search");
        assert_eq!((first.total, o1, o2), (1, Outcome::Searched, Outcome::Kept));
        assert_eq!(first, again);
        b.ingest(&[page("http://x.test/2", "zebra")], u64::MAX, Links::Admit)
            .await
            .expect("ingest by another");
        let (after, o3) = cache.search(&a, &query("zebra")).await.expect("search");
        assert_eq!((after.total, o3), (2, Outcome::Searched));
        let (_, o4) = cache.search(&a, &query("zebra")).await.expect("search");
        assert_eq!(o4, Outcome::Kept);
        // Another page, offset or word is another question.
        let deeper = SearchQuery {
            offset: 1,
            ..query("zebra")
        };
        assert_eq!(
            cache.search(&a, &deeper).await.expect("search").1,
            Outcome::Searched
        );
    }

    #[tokio::test]
    async fn the_bytes_kept_stay_under_the_bound_and_zero_keeps_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path()).await;
        let crawl = s.create_crawl(UNLIMITED).await.expect("crawl");
        let seeds: Vec<_> = (0..50)
            .map(|i| seed(&format!("http://x.test/{i}")))
            .collect();
        s.admit_seeds(crawl, &seeds, u64::MAX).await.expect("admit");
        let pages: Vec<_> = (0..50)
            .map(|i| page(&format!("http://x.test/{i}"), &format!("common word{i}")))
            .collect();
        s.ingest(&pages, u64::MAX, Links::Admit)
            .await
            .expect("ingest");
        let bound = 4_000;
        let cache = SearchCache::new(bound);
        for i in 0..50 {
            cache
                .search(&s, &query(&format!("word{i}")))
                .await
                .expect("search");
        }
        let size = cache.settle();
        assert!(size > 0 && size <= bound, "{size}");
        let none = SearchCache::new(0);
        for _ in 0..2 {
            let (r, o) = none.search(&s, &query("common")).await.expect("search");
            assert_eq!((r.total, o), (50, Outcome::Searched));
        }
    }
}
