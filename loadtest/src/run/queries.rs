//! What the clients search for: words of the synthetic web, drawn as often as pages carry them
//! (the web's word frequencies are Zipf, so a few words are asked often and most rarely, as a
//! real query log would be).
//!
//! The words are read from the pages the oracle says a correct crawler indexes (their text
//! between tags), so every word asked can be found once the crawl is done.

use std::collections::BTreeMap;

use rand::distr::weighted::WeightedIndex;
use rand::distr::Distribution as _;
use rand::SeedableRng as _;
use rand_chacha::ChaCha8Rng;
use synthweb::{SyntheticWeb, WebSpec};

use super::profile::SearchSpec;

/// The words of a web, with the number of pages each occurs on.
pub struct Vocabulary {
    pub words: Vec<(String, u32)>,
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
        for url in web.expect(&web.seeds(), None) {
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

/// An endless, seeded stream of queries.
pub struct Queries {
    words: Vec<String>,
    pick: WeightedIndex<u32>,
    rng: ChaCha8Rng,
    per_query: usize,
}

impl Queries {
    pub fn new(vocabulary: &Vocabulary, seed: u64, per_query: usize) -> anyhow::Result<Queries> {
        anyhow::ensure!(
            !vocabulary.words.is_empty(),
            "the synthetic web has no words to search for"
        );
        let pick = WeightedIndex::new(vocabulary.words.iter().map(|(_, n)| *n))?;
        Ok(Queries {
            words: vocabulary.words.iter().map(|(w, _)| w.clone()).collect(),
            pick,
            rng: ChaCha8Rng::seed_from_u64(seed),
            per_query: per_query.max(1),
        })
    }

    pub fn next_query(&mut self) -> String {
        let mut q = String::new();
        for i in 0..self.per_query {
            if i > 0 {
                q.push(' ');
            }
            q.push_str(&self.words[self.pick.sample(&mut self.rng)]);
        }
        q
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
        let mut a = Queries::new(&vocabulary, 9, 1).expect("words");
        let mut b = Queries::new(&vocabulary, 9, 1).expect("words");
        let asked: Vec<String> = (0..2000).map(|_| a.next_query()).collect();
        let again: Vec<String> = (0..2000).map(|_| b.next_query()).collect();
        assert_eq!(asked, again, "seeded");
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
        let two = Queries::new(&vocabulary, 9, 2).expect("words").next_query();
        assert_eq!(two.split(' ').count(), 2);
    }
}
