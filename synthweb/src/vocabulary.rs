//! The made-up vocabulary of the synthetic web and the power-law samplers that draw from it.
//!
//! Words are pronounceable syllable strings, lowercase, at least four letters long and unique.
//! Every word ends in a consonant followed by `a` or `o`: no suffix the Porter or Snowball
//! English stemmers remove ends that way, so a full-text engine that stems (PostgreSQL's
//! `english` configuration) indexes each word as itself and hit counts stay exact.
//!
//! A few extra words carry one Latin-1 letter (`é`, `ü`, ...). They only appear on pages served
//! in windows-1252 / ISO-8859-1. Their diacritic-free spelling collides with no other word, so
//! engines that fold diacritics (SQLite FTS5 `unicode61`) do not merge them with anything.

use std::collections::HashSet;

use rand::Rng;

const ONSETS: &[&str] = &[
    "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "pl",
    "st", "tr", "sh", "ch", "th", "gl",
];
const NUCLEI: &[&str] = &["a", "e", "i", "o", "u", "ai", "ei", "ou"];
/// Empty codas are repeated so that open syllables are the most common.
const CODAS: &[&str] = &["", "", "", "", "n", "r", "l", "s", "k", "m"];
const FINAL_VOWELS: &[&str] = &["a", "o"];
/// Accented vowels of Latin-1, with their diacritic-free letter.
const ACCENTED: &[(char, char)] = &[
    ('é', 'e'),
    ('è', 'e'),
    ('ê', 'e'),
    ('ë', 'e'),
    ('á', 'a'),
    ('à', 'a'),
    ('â', 'a'),
    ('ä', 'a'),
    ('í', 'i'),
    ('î', 'i'),
    ('ï', 'i'),
    ('ó', 'o'),
    ('ô', 'o'),
    ('ö', 'o'),
    ('ú', 'u'),
    ('û', 'u'),
    ('ü', 'u'),
];

/// How many Latin-1 words the vocabulary carries.
pub(crate) const LATIN_WORDS: usize = 24;

/// All words: `ascii` ASCII words first (index = Zipf rank), then the Latin-1 words.
pub(crate) struct Vocabulary {
    pub(crate) words: Vec<String>,
    pub(crate) ascii: usize,
}

impl Vocabulary {
    pub(crate) fn generate(rng: &mut impl Rng, ascii: usize) -> Self {
        let mut words = Vec::with_capacity(ascii + LATIN_WORDS);
        let mut taken = HashSet::with_capacity(ascii + LATIN_WORDS);
        while words.len() < ascii {
            let word = syllable_word(rng);
            if taken.insert(word.clone()) {
                words.push(word);
            }
        }
        // `taken` holds every ASCII word and the folded form of every Latin-1 word.
        while words.len() < ascii + LATIN_WORDS {
            let plain = syllable_word(rng);
            if taken.contains(&plain) {
                continue;
            }
            let Some(word) = accent_one_vowel(rng, &plain) else {
                continue;
            };
            taken.insert(plain);
            words.push(word);
        }
        Self { words, ascii }
    }

    pub(crate) fn word(&self, id: u32) -> &str {
        &self.words[id as usize]
    }

    pub(crate) fn is_latin(&self, id: u32) -> bool {
        id as usize >= self.ascii
    }

    pub(crate) fn latin_ids(&self) -> std::ops::Range<u32> {
        self.ascii as u32..self.words.len() as u32
    }
}

fn syllable_word(rng: &mut impl Rng) -> String {
    let syllables = match rng.random_range(0..20) {
        0..=8 => 2,
        9..=16 => 3,
        _ => 4,
    };
    let mut word = String::with_capacity(12);
    for _ in 1..syllables {
        word.push_str(pick(rng, ONSETS));
        word.push_str(pick(rng, NUCLEI));
        word.push_str(pick(rng, CODAS));
    }
    word.push_str(pick(rng, ONSETS));
    word.push_str(pick(rng, FINAL_VOWELS));
    word
}

/// Replace one vowel before the last syllable with an accented one (never the first letter,
/// which is always a consonant, and never the final `a`/`o`).
fn accent_one_vowel(rng: &mut impl Rng, plain: &str) -> Option<String> {
    let bytes = plain.as_bytes();
    let last = bytes.len() - 1;
    let vowels: Vec<usize> = (1..last)
        .filter(|&i| matches!(bytes[i], b'a' | b'e' | b'i' | b'o' | b'u'))
        .collect();
    let &at = vowels.get(rng.random_range(0..vowels.len().max(1)))?;
    let choices: Vec<char> = ACCENTED
        .iter()
        .filter(|(_, base)| *base as u8 == bytes[at])
        .map(|(accented, _)| *accented)
        .collect();
    let accented = choices[rng.random_range(0..choices.len())];
    let mut word = String::with_capacity(plain.len() + 1);
    word.push_str(&plain[..at]);
    word.push(accented);
    word.push_str(&plain[at + 1..]);
    Some(word)
}

fn pick<'a>(rng: &mut impl Rng, from: &[&'a str]) -> &'a str {
    from[rng.random_range(0..from.len())]
}

/// A Zipf (power-law) distribution over ranks `0..n`: rank `r` has weight `(r + 1 + q)^-s`
/// (q = 0: Zipf; q > 0: Zipf-Mandelbrot, whose flatter head suits word frequencies).
pub(crate) struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    pub(crate) fn new(n: usize, s: f64) -> Self {
        Self::mandelbrot(n, s, 0.0)
    }

    pub(crate) fn mandelbrot(n: usize, s: f64, q: f64) -> Self {
        let mut total = 0.0;
        let cumulative = (1..=n.max(1))
            .map(|rank| {
                total += (rank as f64 + q).powf(-s);
                total
            })
            .collect();
        Self { cumulative }
    }

    pub(crate) fn sample(&self, rng: &mut impl Rng) -> usize {
        let total = self.cumulative[self.cumulative.len() - 1];
        let x = rng.random::<f64>() * total;
        self.cumulative
            .partition_point(|&c| c <= x)
            .min(self.cumulative.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    #[test]
    fn words_are_unique_lowercase_and_stem_stable() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let vocabulary = Vocabulary::generate(&mut rng, 3000);
        let mut seen = HashSet::new();
        for (i, word) in vocabulary.words.iter().enumerate() {
            assert!(word.chars().count() >= 4, "{word}");
            assert!(word.ends_with('a') || word.ends_with('o'), "{word}");
            assert!(seen.insert(word.clone()), "duplicate {word}");
            if i < vocabulary.ascii {
                assert!(word.bytes().all(|b| b.is_ascii_lowercase()), "{word}");
            } else {
                assert!(!word.is_ascii(), "{word}");
                assert!(word.chars().all(|c| (c as u32) < 0x100 && c.is_lowercase()));
            }
        }
        let folded: HashSet<String> = vocabulary.words[vocabulary.ascii..]
            .iter()
            .map(|w| {
                w.chars()
                    .map(|c| {
                        ACCENTED
                            .iter()
                            .find(|(a, _)| *a == c)
                            .map_or(c, |(_, b)| *b)
                    })
                    .collect()
            })
            .collect();
        assert_eq!(folded.len(), LATIN_WORDS);
        assert!(folded.iter().all(|f| !vocabulary.words.contains(f)));
    }

    #[test]
    fn zipf_favours_low_ranks() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let zipf = Zipf::new(100, 1.0);
        let mut counts = [0usize; 100];
        for _ in 0..10_000 {
            counts[zipf.sample(&mut rng)] += 1;
        }
        assert!(counts[0] > counts[10] && counts[10] > counts[99]);
    }
}
