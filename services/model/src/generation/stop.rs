//! Stop sequences on the decoded text, with hold-back of text that may start one.

/// The stop sequences of a request.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Byte offset of the earliest occurrence of any stop sequence in `text[from..]`.
    pub fn find(&self, text: &str, from: usize) -> Option<usize> {
        let tail = text.get(from..)?;
        self.stops
            .iter()
            .filter_map(|s| tail.find(s.as_str()))
            .min()
            .map(|i| from + i)
    }

    /// The longest prefix of `text` (at least `from` bytes) that cannot be the start of a stop
    /// sequence: the first character boundary `i >= from` where `text[i..]` is a proper prefix
    /// of some stop sequence, or `text.len()`.
    pub fn safe_len(&self, text: &str, from: usize) -> usize {
        if self.stops.is_empty() {
            return text.len();
        }
        (from..text.len())
            .filter(|&i| text.is_char_boundary(i))
            .find(|&i| {
                let rest = &text[i..];
                self.stops
                    .iter()
                    .any(|s| s.len() > rest.len() && s.starts_with(rest))
            })
            .unwrap_or(text.len())
    }
}

/// The text of one generated sequence as it streams: what has been emitted, what is held back
/// because it may begin a stop sequence, and where a stop sequence matched.
#[derive(Debug, Clone, Default)]
pub struct TextStream {
    matcher: StopMatcher,
    text: String,
    emitted: usize,
    stopped_at: Option<usize>,
}

impl TextStream {
    pub fn new(matcher: StopMatcher) -> Self {
        TextStream {
            matcher,
            ..TextStream::default()
        }
    }

    /// True once a stop sequence has matched.
    pub fn is_stopped(&self) -> bool {
        self.stopped_at.is_some()
    }

    /// Appends decoded text; returns the text that may now be emitted. After a stop sequence
    /// matches, only the text before it is ever emitted.
    pub fn push(&mut self, piece: &str) -> String {
        if self.stopped_at.is_some() {
            return String::new();
        }
        self.text.push_str(piece);
        let end = match self.matcher.find(&self.text, self.emitted) {
            Some(at) => {
                self.stopped_at = Some(at);
                at
            }
            None => self.matcher.safe_len(&self.text, self.emitted),
        };
        self.emit_to(end)
    }

    /// Emits what was held back (the sequence ended without completing a stop sequence).
    pub fn flush(&mut self) -> String {
        let end = self.stopped_at.unwrap_or(self.text.len());
        self.emit_to(end)
    }

    fn emit_to(&mut self, end: usize) -> String {
        let end = end.max(self.emitted);
        let out = self.text[self.emitted..end].to_owned();
        self.emitted = end;
        out
    }

    /// The whole text, cut before the stop sequence if one matched.
    pub fn into_text(mut self) -> String {
        if let Some(at) = self.stopped_at {
            self.text.truncate(at);
        }
        self.text
    }
}
