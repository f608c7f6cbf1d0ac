//! `--json` output: one JSON object a line on stdout, flushed at once so a reader sees each
//! result as it comes.

use std::io::Write as _;

use serde::Serialize;

/// Print `line` as one line of JSON; `who` names the command in the message should it not
/// encode.
pub fn print(who: &str, line: &impl Serialize) {
    match serde_json::to_string(line) {
        Ok(text) => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{text}");
            let _ = out.flush();
        }
        Err(e) => eprintln!("{who}: cannot encode a result as JSON: {e}"),
    }
}
