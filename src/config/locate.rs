//! Line and column of each YAML path, for error messages.
//!
//! `serde_yaml::Value` keeps no positions, so when a file has problems we
//! replay it through yaml-rust2's event parser and note where each mapping key
//! and list item starts, keyed by the same path strings the decoder reports.

use std::collections::HashMap;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A 1-based position in the configuration file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    /// Line, counting from 1.
    pub line: usize,
    /// Column, counting from 1.
    pub column: usize,
}

/// Positions of the paths of one document.
pub(super) struct Locations(HashMap<String, Location>);

impl Locations {
    /// Index `src`; a document that does not parse yields no positions.
    pub(super) fn of(src: &str) -> Self {
        let mut recv = Recorder::default();
        let _ = Parser::new_from_str(src).load(&mut recv, false);
        Locations(recv.found)
    }

    /// Where `path` starts, or where its nearest enclosing path starts.
    pub(super) fn find(&self, path: &str) -> Option<Location> {
        let mut path = path;
        loop {
            if let Some(loc) = self.0.get(path) {
                return Some(*loc);
            }
            let cut = path.rfind(['.', '['])?;
            path = &path[..cut];
        }
    }
}

enum Frame {
    /// `unplaced`: the mapping's own position is taken from its first key,
    /// because a block mapping's start event points past that key.
    Map {
        path: String,
        key: Option<String>,
        unplaced: bool,
    },
    Seq {
        path: String,
        index: usize,
    },
}

#[derive(Default)]
struct Recorder {
    stack: Vec<Frame>,
    found: HashMap<String, Location>,
}

impl Recorder {
    fn record(&mut self, path: &str, mark: Marker) {
        self.found.entry(path.to_string()).or_insert(Location {
            line: mark.line(),
            // yaml-rust2 counts columns from 0.
            column: mark.col() + 1,
        });
    }

    /// Give a mapping that is still unplaced the position of its first node.
    fn place_pending_map(&mut self, mark: Marker) {
        if let Some(Frame::Map {
            path,
            unplaced: unplaced @ true,
            ..
        }) = self.stack.last_mut()
        {
            *unplaced = false;
            let path = path.clone();
            self.record(&path, mark);
        }
    }

    /// The path of the node that starts now, and whether it is a mapping key.
    fn claim(&mut self, key_text: &str) -> (String, bool) {
        match self.stack.last_mut() {
            None => (String::new(), false),
            Some(Frame::Map {
                path, key: None, ..
            }) => (super::decode::join(path, key_text), true),
            Some(Frame::Map {
                path, key: Some(k), ..
            }) => (super::decode::join(path, k), false),
            Some(Frame::Seq { path, index }) => {
                let p = format!("{path}[{index}]");
                *index += 1;
                (p, false)
            }
        }
    }

    fn set_key(&mut self, text: &str) {
        if let Some(Frame::Map { key, .. }) = self.stack.last_mut() {
            *key = Some(text.to_string());
        }
    }

    /// A value of the enclosing mapping is complete: expect the next key.
    fn value_done(&mut self) {
        if let Some(Frame::Map { key, .. }) = self.stack.last_mut() {
            *key = None;
        }
    }
}

impl MarkedEventReceiver for Recorder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let text = match &ev {
            Event::Scalar(text, ..) => text.as_str(),
            // Collections used as keys are rare; they get the placeholder `?`.
            Event::Alias(_) | Event::MappingStart(..) | Event::SequenceStart(..) => "?",
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.value_done();
                return;
            }
            _ => return,
        };
        self.place_pending_map(mark);
        let (path, is_key) = self.claim(text);
        if is_key {
            self.set_key(text);
        }
        match ev {
            Event::MappingStart(..) => {
                self.stack.push(Frame::Map {
                    path,
                    key: None,
                    unplaced: true,
                });
            }
            Event::SequenceStart(..) => {
                self.record(&path, mark);
                self.stack.push(Frame::Seq { path, index: 0 });
            }
            _ => {
                self.record(&path, mark);
                if !is_key {
                    self.value_done();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
listeners:
  web:
    bind: 0.0.0.0:80
    pool: app
pools:
  app:
    backends:
      - address: 10.0.0.1:80
      - address: 10.0.0.2:80
        weight: 0
    health_check: { rise: 0 }
";

    #[test]
    fn finds_keys_and_items() {
        let l = Locations::of(DOC);
        assert_eq!(
            l.find("listeners.web.pool"),
            Some(Location { line: 4, column: 5 })
        );
        assert_eq!(
            l.find("pools.app.backends[1]"),
            Some(Location { line: 9, column: 9 })
        );
        assert_eq!(
            l.find("pools.app.backends[1].weight"),
            Some(Location {
                line: 10,
                column: 9
            })
        );
        assert_eq!(
            l.find("pools.app.health_check.rise"),
            Some(Location {
                line: 11,
                column: 21
            })
        );
    }

    #[test]
    fn falls_back_to_the_enclosing_path() {
        let l = Locations::of(DOC);
        assert_eq!(
            l.find("pools.app.backends[0].backup"),
            Some(Location { line: 8, column: 9 })
        );
        assert_eq!(l.find("nowhere.at.all"), None);
    }
}
