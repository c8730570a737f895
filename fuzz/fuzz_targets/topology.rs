//! `config::parse` on arbitrary UTF-8: a topology document is either accepted or refused
//! with errors, never a panic (the same function serves `envgate check` and every reload).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match envgate::config::parse(text, Path::new("/nonexistent")) {
        Ok(topology) => {
            // A valid topology's entry addresses, as validation printed them, parse again.
            for env in &topology.environments {
                for e in &env.entries {
                    assert!(
                        envgate::routing::host::Entry::parse(e).is_ok(),
                        "entry {e:?} of a valid topology does not parse again"
                    );
                }
            }
        }
        Err(e) => {
            // Every error renders (the messages are printed by `check` and on reload).
            let _ = e.to_string();
        }
    }
});
