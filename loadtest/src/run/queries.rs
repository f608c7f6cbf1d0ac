//! What the clients search for: words of the synthetic web, drawn as often as pages carry them
//! (the web's word frequencies are Zipf, so a few words are asked often and most rarely, as a
//! real query log would be).
//!
//! The words are read from the pages the oracle says a correct crawler indexes (their text
//! between tags), so every word asked can be found once the crawl is done.

use std::collections::BTreeMap;

use rand::distr::weighted::WeightedIndex;
use rand::distr::Distribution as _;
use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;
use synthweb::{SyntheticWeb, WebSpec};

use super::profile::{SearchSpec, Terms};

/// The words of a web, with the number of pages each occurs on.
pub struct Vocabulary {
    pub words: Vec<(String, u32)>,
    /// Pages a correct crawl indexes.
    pub pages: usize,
}

impl Vocabulary {
    /// Generate the web of `spec` and read its indexed pages' words.
    pub fn of_spec(spec: &SearchSpec) -> Vocabulary {
        let web = SyntheticWeb::generate(&WebSpec {
            seed: spec.web_seed,
            pages: spec.web_pages,
            hosts: spec.web_hosts,
            latency: std::time::Duration::ZERO,
        });
        Vocabulary::of(&web)
    }

    pub fn of(web: &SyntheticWeb) -> Vocabulary {
        let mut pages_with: BTreeMap<String, u32> = BTreeMap::new();
        let indexed = web.expect(&web.seeds(), None);
        let pages = indexed.len();
        for url in indexed {
            let Some(body) = web.body(&url) else { continue };
            let text = String::from_utf8_lossy(body);
            let mut on_page: Vec<String> = page_words(&text).collect();
            on_page.sort();
            on_page.dedup();
            for w in on_page {
                *pages_with.entry(w).or_default() += 1;
            }
        }
        Vocabulary {
            words: pages_with.into_iter().collect(),
            pages,
        }
    }
}

/// The words of a page's text (between tags; no words of tag names, attributes, scripts):
/// lower-case runs of ASCII letters, 3 to 20 long (Latin-1 pages decoded lossily would
/// otherwise give broken words).
fn page_words(html: &str) -> impl Iterator<Item = String> + '_ {
    let mut text = String::with_capacity(html.len());
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => {
                in_tag = true;
                text.push(' ');
            }
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.split(|c: char| !c.is_ascii_alphabetic())
        .filter(|w| (3..=20).contains(&w.len()))
        .map(str::to_ascii_lowercase)
        .collect::<Vec<_>>()
        .into_iter()
}

/// One search to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub q: String,
    pub offset: u64,
}

/// An endless, seeded stream of queries.
pub struct Queries {
    words: Vec<String>,
    pick: WeightedIndex<u32>,
    rng: ChaCha8Rng,
    per_query: usize,
    limit: u32,
    pages_deep: u32,
}

impl Queries {
    /// Queries of `spec`'s kind: its terms, words per query, result pages and seed.
    pub fn new(vocabulary: &Vocabulary, spec: &SearchSpec) -> anyhow::Result<Queries> {
        // The words, and how often each is drawn.
        let (chosen, weights): (Vec<&String>, Vec<u32>) = match spec.terms {
            Terms::Common => vocabulary.words.iter().map(|(w, n)| (w, *n)).unzip(),
            Terms::Rare => {
                let at_most = (vocabulary.pages / 100).max(1);
                vocabulary
                    .words
                    .iter()
                    .filter(|(_, n)| *n as usize <= at_most)
                    .map(|(w, _)| (w, 1))
                    .unzip()
            }
        };
        anyhow::ensure!(
            !chosen.is_empty(),
            "the synthetic web has no {} words to search for",
            spec.terms
        );
        let pick = WeightedIndex::new(weights)?;
        Ok(Queries {
            words: chosen.into_iter().cloned().collect(),
            pick,
            rng: ChaCha8Rng::seed_from_u64(spec.seed),
            per_query: spec.words.max(1),
            limit: spec.limit,
            pages_deep: spec.pages_deep.max(1),
        })
    }

    pub fn next_query(&mut self) -> Query {
        let mut q = String::new();
        for i in 0..self.per_query {
            if i > 0 {
                q.push(' ');
            }
            q.push_str(&self.words[self.pick.sample(&mut self.rng)]);
        }
        let page = if self.pages_deep > 1 {
            self.rng.random_range(0..self.pages_deep)
        } else {
            0
        };
        Query {
            q,
            offset: u64::from(page) * u64::from(self.limit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_come_from_page_text_and_common_words_are_asked_more() {
        let words: Vec<String> =
            page_words("<html><title>Rusty Crab</title><p class=\"x\">the crab at sea 42</p>")
                .collect();
        assert_eq!(words, ["rusty", "crab", "the", "crab", "sea"]);
        let web = SyntheticWeb::generate(&WebSpec {
            seed: 3,
            pages: 200,
            hosts: 4,
            latency: std::time::Duration::ZERO,
        });
        let vocabulary = Vocabulary::of(&web);
        assert!(vocabulary.words.len() > 50, "{}", vocabulary.words.len());
        let spec = SearchSpec {
            seed: 9,
            ..SearchSpec::default()
        };
        let mut a = Queries::new(&vocabulary, &spec).expect("words");
        let mut b = Queries::new(&vocabulary, &spec).expect("words");
        let asked: Vec<Query> = (0..2000).map(|_| a.next_query()).collect();
        let again: Vec<Query> = (0..2000).map(|_| b.next_query()).collect();
        assert_eq!(asked, again, "seeded");
        assert!(asked.iter().all(|q| q.offset == 0), "first pages only");
        let asked: Vec<String> = asked.into_iter().map(|q| q.q).collect();
        let count = |w: &str| asked.iter().filter(|q| *q == w).count();
        let (common, _) = vocabulary
            .words
            .iter()
            .max_by_key(|(_, n)| *n)
            .expect("a word");
        let (rare, _) = vocabulary
            .words
            .iter()
            .min_by_key(|(_, n)| *n)
            .expect("a word");
        assert!(count(common) > count(rare), "{common} vs {rare}");
        let two = Queries::new(
            &vocabulary,
            &SearchSpec {
                words: 2,
                ..spec.clone()
            },
        )
        .expect("words")
        .next_query();
        assert_eq!(two.q.split(' ').count(), 2);
    }

    #[test]
    fn rare_terms_are_on_few_pages_and_deep_pages_are_asked() {
        let web = SyntheticWeb::generate(&WebSpec {
            seed: 3,
            pages: 2000,
            hosts: 4,
            latency: std::time::Duration::ZERO,
        });
        let vocabulary = Vocabulary::of(&web);
        let on_pages: BTreeMap<&str, u32> = vocabulary
            .words
            .iter()
            .map(|(w, n)| (w.as_str(), *n))
            .collect();
        let at_most = (vocabulary.pages / 100).max(1) as u32;
        let spec = SearchSpec {
            terms: Terms::Rare,
            pages_deep: 3,
            limit: 10,
            ..SearchSpec::default()
        };
        let mut rare = Queries::new(&vocabulary, &spec).expect("rare words");
        let asked: Vec<Query> = (0..600).map(|_| rare.next_query()).collect();
        for q in &asked {
            let n = on_pages[q.q.as_str()];
            assert!(n <= at_most, "{} is on {n} pages", q.q);
        }
        let offsets: std::collections::BTreeSet<u64> = asked.iter().map(|q| q.offset).collect();
        assert_eq!(offsets.into_iter().collect::<Vec<_>>(), [0, 10, 20]);
    }
}
