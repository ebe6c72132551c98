//! yaml-rust2's event parser, for what `serde_yaml` cannot tell: how deeply
//! a file nests (before `serde_yaml` reads it), and where each YAML path
//! starts (after, for error messages).
//!
//! libyaml, under `serde_yaml`, takes time quadratic in the nesting depth of
//! flow collections (a file of 50,000 `[` took seconds to minutes), and
//! `serde_yaml` copies the value of an anchor for each of its aliases, so
//! every file first goes through [`check_shape`], which stops at the first
//! node nested too deeply or aliased too often. `serde_yaml::Value` keeps no positions, so when a file
//! has problems we replay it and note where each mapping key and list item
//! starts, keyed by the same path strings the decoder reports.

use std::collections::{HashMap, HashSet};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// Why a file was refused before it was decoded.
pub(super) struct Unreadable {
    /// What is wrong.
    pub(super) message: String,
    /// Where.
    pub(super) location: Location,
}

/// Walk `src`'s events, stopping at the first syntax error, at the first
/// collection nested more than `max_depth` levels deep, or once the document
/// would hold more than `max_nodes` values with its aliases expanded (as
/// `serde_yaml` expands them: a 42 KB file of aliases to a long list took
/// 700 MB). Work and memory stay proportional to the file's size: the
/// scanner holds at most `max_depth` open collections when it stops (and
/// yaml-rust2 itself stops at 255 open flow collections, however far it
/// scans ahead).
pub(super) fn check_shape(src: &str, max_depth: usize, max_nodes: u64) -> Result<(), Unreadable> {
    let refuse = |message: String, mark| Unreadable {
        message: format!("not accepted: {message}"),
        location: location(mark),
    };
    let too_deep = |mark| {
        refuse(
            format!(
                "the YAML is nested more than {max_depth} levels deep \
                 (a configuration needs at most 6)"
            ),
            mark,
        )
    };
    let mut parser = Parser::new_from_str(src);
    // Open collections: their anchor and the node count when they opened.
    let mut open: Vec<(usize, u64)> = Vec::new();
    // Values each anchor stands for, by anchor id.
    let mut anchored: HashMap<usize, u64> = HashMap::new();
    let mut nodes: u64 = 0;
    loop {
        let (event, mark) = match parser.next_token() {
            Ok(next) => next,
            // The scanner reads ahead through flow collections (`[[[[`) up
            // to its own limit before the parser sees the first of them.
            Err(e) if e.info() == "recursion limit exceeded" => return Err(too_deep(*e.marker())),
            Err(e) => {
                return Err(Unreadable {
                    message: format!("not valid YAML: {}", e.info()),
                    location: location(*e.marker()),
                });
            }
        };
        match event {
            Event::MappingStart(anchor, _) | Event::SequenceStart(anchor, _) => {
                if open.len() == max_depth {
                    return Err(too_deep(mark));
                }
                open.push((anchor, nodes));
                nodes += 1;
            }
            Event::MappingEnd | Event::SequenceEnd => {
                if let Some((anchor, start)) = open.pop() {
                    if anchor != 0 {
                        anchored.insert(anchor, nodes - start);
                    }
                }
            }
            Event::Scalar(_, _, anchor, _) => {
                nodes += 1;
                if anchor != 0 {
                    anchored.insert(anchor, 1);
                }
            }
            Event::Alias(anchor) => nodes += anchored.get(&anchor).copied().unwrap_or(1),
            Event::StreamEnd => return Ok(()),
            _ => {}
        }
        if nodes > max_nodes {
            return Err(refuse(
                format!(
                    "the YAML holds more than {max_nodes} values once its aliases are expanded"
                ),
                mark,
            ));
        }
    }
}

fn location(mark: Marker) -> Location {
    Location {
        line: mark.line(),
        // yaml-rust2 counts columns from 0.
        column: mark.col() + 1,
    }
}

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
    /// Index the positions in `src` of `paths` and of the paths that hold
    /// them (only those: a file may have millions of paths); a document
    /// that does not parse yields no positions.
    pub(super) fn of<'p>(src: &str, paths: impl IntoIterator<Item = &'p str>) -> Self {
        let mut wanted = HashSet::new();
        for mut path in paths {
            while wanted.insert(path.to_string()) {
                let Some(cut) = path.rfind(['.', '[']) else {
                    break;
                };
                path = &path[..cut];
            }
        }
        let mut recv = Recorder {
            stack: Vec::new(),
            found: HashMap::new(),
            wanted,
        };
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

struct Recorder {
    stack: Vec<Frame>,
    found: HashMap<String, Location>,
    wanted: HashSet<String>,
}

impl Recorder {
    fn record(&mut self, path: &str, mark: Marker) {
        if self.wanted.contains(path) && !self.found.contains_key(path) {
            self.found.insert(path.to_string(), location(mark));
        }
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

    /// Every path the tests below ask about.
    fn locations() -> Locations {
        Locations::of(
            DOC,
            [
                "listeners.web.pool",
                "pools.app.backends[1].weight",
                "pools.app.health_check.rise",
                "pools.app.backends[0].backup",
            ],
        )
    }

    #[test]
    fn finds_keys_and_items() {
        let l = locations();
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
        let l = locations();
        assert_eq!(
            l.find("pools.app.backends[0].backup"),
            Some(Location { line: 8, column: 9 })
        );
        assert_eq!(l.find("nowhere.at.all"), None);
    }

    #[test]
    fn records_only_the_paths_asked_for() {
        let l = Locations::of(DOC, ["pools.app.backends[1].weight"]);
        assert_eq!(
            l.find("pools.app.backends[0]"),
            Some(Location { line: 7, column: 5 }),
            "an unrecorded path falls back to its nearest recorded parent"
        );
        assert_eq!(l.0.len(), 5, "{:?}", l.0.keys());
    }

    #[test]
    fn depth_and_size_are_checked_before_anything_else() {
        assert!(check_shape(DOC, 5, 100).is_ok());
        let e = check_shape(DOC, 4, 100).err().unwrap();
        assert_eq!(
            e.message,
            "not accepted: the YAML is nested more than 4 levels deep (a configuration needs at most 6)"
        );
        // The mapping of backends[0], on line 8 (a block mapping's start
        // event points past its first key, so the column says little).
        assert_eq!(e.location.line, 8);
        let e = check_shape("a: [b\n", 10, 100).err().unwrap();
        assert!(e.message.starts_with("not valid YAML: "), "{}", e.message);

        // The root; `a` and its list of 3 (5); `b` and `*x` (5); `c`, its
        // list and two `*x` (10); `d`, its list and two `*y` of 9 (20): 41.
        let aliases = "{ a: &x [1, 2, 3], b: *x, c: &y [*x, *x], d: [*y, *y] }";
        assert!(check_shape(aliases, 5, 41).is_ok());
        let e = check_shape(aliases, 5, 40).err().unwrap();
        assert_eq!(
            e.message,
            "not accepted: the YAML holds more than 40 values once its aliases are expanded"
        );
    }
}
