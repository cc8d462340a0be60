//! BuildKit's shell words, for reading Dockerfiles: splitting an instruction's arguments into
//! words ([`split_words`]) and expanding a word ([`expand`]) like BuildKit's shell lexer: quotes,
//! the escape character, `$V`, `${V}`, `${V:-d}`, `${V-d}`, `${V:+a}`, `${V+a}`, `${V:?e}`,
//! `${V?e}`, `${V#p}`, `${V##p}`, `${V%p}`, `${V%%p}`, `${V/p/r}` and `${V//p/r}`.

use std::collections::HashMap;

/// Splits on blanks outside quotes, keeping quotes and escapes in the words.
pub fn split_words(s: &str, escape: char) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match quote {
            Some(q) => {
                word.push(c);
                if c == q {
                    quote = None;
                } else if c == escape && q == '"' {
                    if let Some(n) = chars.next() {
                        word.push(n);
                    }
                }
            }
            None if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            None => {
                word.push(c);
                if c == '"' || c == '\'' {
                    quote = Some(c);
                } else if c == escape {
                    if let Some(n) = chars.next() {
                        word.push(n);
                    }
                }
            }
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// Variables in scope: global `ARG`s, or a stage's `ARG`s and `ENV`s. Absent means unset.
pub type Env = HashMap<String, String>;

/// Expands one word like BuildKit's shell lexer: quotes removed, escapes applied, variables
/// substituted from `env` (an unset variable is empty).
pub fn expand(word: &str, env: &Env, escape: char) -> Result<String, String> {
    let mut lexer = Lexer {
        chars: word.chars().collect(),
        pos: 0,
        env,
        escape,
    };
    lexer
        .until(None, false)
        .map_err(|e| format!("cannot expand {word:?}: {e}"))
}

struct Lexer<'a> {
    chars: Vec<char>,
    pos: usize,
    env: &'a Env,
    escape: char,
}

impl Lexer<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        self.pos += usize::from(c.is_some());
        c
    }

    /// Reads up to `stop` (consumed) or the end. `raw_escapes` keeps escape characters (for
    /// patterns, where they quote `*` and `?`).
    fn until(&mut self, stop: Option<char>, raw_escapes: bool) -> Result<String, String> {
        let mut out = String::new();
        while let Some(c) = self.peek() {
            if Some(c) == stop {
                self.pos += 1;
                return Ok(out);
            }
            match c {
                '$' => out.push_str(&self.dollar()?),
                '\'' => out.push_str(&self.single_quoted()?),
                '"' => out.push_str(&self.double_quoted()?),
                _ => {
                    self.pos += 1;
                    if c == self.escape {
                        if raw_escapes {
                            out.push(c);
                        }
                        match self.next() {
                            Some(n) => out.push(n),
                            None => break,
                        }
                    } else {
                        out.push(c);
                    }
                }
            }
        }
        match stop {
            Some(s) => Err(format!("no matching {s:?}")),
            None => Ok(out),
        }
    }

    fn single_quoted(&mut self) -> Result<String, String> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            match self.next() {
                None => return Err("no matching single quote".into()),
                Some('\'') => return Ok(out),
                Some(c) => out.push(c),
            }
        }
    }

    fn double_quoted(&mut self) -> Result<String, String> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            match self.peek() {
                None => return Err("no matching double quote".into()),
                Some('"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some('$') => out.push_str(&self.dollar()?),
                Some(c) => {
                    self.pos += 1;
                    let mut c = c;
                    if c == self.escape {
                        match self.peek() {
                            None => continue,
                            Some(n) if n == '"' || n == '$' || n == self.escape => {
                                self.pos += 1;
                                c = n;
                            }
                            Some(_) => {}
                        }
                    }
                    out.push(c);
                }
            }
        }
    }

    /// A name after `$`: digits, one special parameter character, or letters, digits and `_`.
    fn name(&mut self) -> String {
        let mut name = String::new();
        match self.peek() {
            Some(c) if c.is_ascii_digit() => {
                while let Some(d) = self.peek().filter(char::is_ascii_digit) {
                    name.push(d);
                    self.pos += 1;
                }
            }
            Some(c @ ('@' | '*' | '#' | '?' | '-' | '$' | '!')) => {
                name.push(c);
                self.pos += 1;
            }
            _ => {
                while let Some(c) = self.peek().filter(|c| c.is_alphanumeric() || *c == '_') {
                    name.push(c);
                    self.pos += 1;
                }
            }
        }
        name
    }

    fn dollar(&mut self) -> Result<String, String> {
        self.pos += 1;
        if self.peek() != Some('{') {
            let name = self.name();
            if name.is_empty() {
                return Ok("$".into());
            }
            return Ok(self.env.get(&name).cloned().unwrap_or_default());
        }
        self.pos += 1;
        match self.peek() {
            None => return Err("missing '}'".into()),
            Some('{' | '}' | ':') => return Err("bad substitution".into()),
            Some(_) => {}
        }
        let name = self.name();
        let value = self.env.get(&name);
        let mut op = self.next().ok_or("missing '}'")?;
        let mut null_is_unset = false;
        if op == ':' {
            null_is_unset = true;
            op = self.next().ok_or("missing '}'")?;
        }
        if op == '}' && !null_is_unset {
            return Ok(value.cloned().unwrap_or_default());
        }
        let unset = value.is_none() || (null_is_unset && value.is_some_and(String::is_empty));
        match op {
            '-' | '+' | '?' => {
                let word = self.until(Some('}'), false)?;
                match op {
                    '-' if unset => Ok(word),
                    '+' if unset => Ok(String::new()),
                    '+' => Ok(word),
                    '?' if unset => {
                        let why = if !word.is_empty() {
                            word
                        } else if value.is_none() {
                            "is not allowed to be unset".into()
                        } else {
                            "is not allowed to be empty".into()
                        };
                        Err(format!("{name}: {why}"))
                    }
                    _ => Ok(value.cloned().unwrap_or_default()),
                }
            }
            '#' | '%' => {
                let mut pattern = self.until(Some('}'), true)?;
                let longest = pattern.starts_with(op);
                if longest {
                    pattern.remove(0);
                }
                let pattern = Pattern::parse(&pattern)?;
                let value: Vec<char> = value.map(|v| v.chars().collect()).unwrap_or_default();
                Ok(if op == '#' {
                    pattern.trim_prefix(&value, longest)
                } else {
                    pattern.trim_suffix(&value, longest)
                })
            }
            '/' if !null_is_unset => {
                let all = self.peek() == Some('/');
                self.pos += usize::from(all);
                let pattern = Pattern::parse(&self.until(Some('/'), true)?)?;
                let with = self.until(Some('}'), true)?;
                let value: Vec<char> = value.map(|v| v.chars().collect()).unwrap_or_default();
                Ok(pattern.replace(&value, &with, all))
            }
            _ => Err(format!("unsupported modifier {op:?} in ${{{name}…}}")),
        }
    }
}

/// A shell pattern of `${V#p}`, `${V%p}` and `${V/p/r}`: `*` any run, `?` one character, a
/// backslash quotes the next one. Unlike repository globs (`access::glob_match`), `*` crosses `/`.
#[derive(Debug)]
struct Pattern(Vec<PatternToken>);

#[derive(Debug, Clone, Copy, PartialEq)]
enum PatternToken {
    Any,
    One,
    Char(char),
}

impl Pattern {
    fn parse(s: &str) -> Result<Pattern, String> {
        let mut out = Vec::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            out.push(match c {
                '*' => PatternToken::Any,
                '?' => PatternToken::One,
                '\\' => match chars.next() {
                    Some(n) => PatternToken::Char(n),
                    None => return Err(format!("pattern {s:?} ends with an escape")),
                },
                c => PatternToken::Char(c),
            });
        }
        Ok(Pattern(out))
    }

    /// For each `j` in `0..=s.len()`, whether the pattern matches all of `s[..j]`: one dynamic
    /// programme, O(pattern × s).
    fn prefix_matches(&self, s: &[char]) -> Vec<bool> {
        let mut row = vec![false; s.len() + 1];
        row[0] = true;
        for t in &self.0 {
            let mut next = vec![false; s.len() + 1];
            for j in 0..=s.len() {
                next[j] = match t {
                    PatternToken::Any => row[j] || (j > 0 && next[j - 1]),
                    PatternToken::One => j > 0 && row[j - 1],
                    PatternToken::Char(c) => j > 0 && row[j - 1] && s[j - 1] == *c,
                };
            }
            row = next;
        }
        row
    }

    /// The shortest (or longest) `j` whose prefix `s[..j]` the pattern matches.
    fn prefix_end(&self, s: &[char], longest: bool) -> Option<usize> {
        let ends = self.prefix_matches(s);
        if longest {
            ends.iter().rposition(|m| *m)
        } else {
            ends.iter().position(|m| *m)
        }
    }

    fn trim_prefix(&self, v: &[char], longest: bool) -> String {
        let from = self.prefix_end(v, longest).unwrap_or(0);
        v[from..].iter().collect()
    }

    fn trim_suffix(&self, v: &[char], longest: bool) -> String {
        // A suffix of `v` matching the pattern is a prefix of reversed `v` matching the reversed
        // pattern.
        let reversed = Pattern(self.0.iter().rev().copied().collect());
        let rv: Vec<char> = v.iter().rev().copied().collect();
        let len = reversed.prefix_end(&rv, longest).unwrap_or(0);
        v[..v.len() - len].iter().collect()
    }

    /// Replaces the leftmost longest match (every match, left to right, with `all`).
    fn replace(&self, v: &[char], with: &str, all: bool) -> String {
        let mut out = String::new();
        let mut i = 0;
        let mut replaced = false;
        // Where the last match ended: an empty match right there is not another one.
        let mut last_end = None;
        while i <= v.len() {
            let found = if replaced && !all {
                None
            } else {
                self.prefix_end(&v[i..], true)
                    .filter(|&len| len > 0 || last_end != Some(i))
            };
            match found {
                Some(len) => {
                    out.push_str(with);
                    replaced = true;
                    last_end = Some(i + len);
                    if len == 0 {
                        // An empty match: keep the character and move on.
                        if let Some(c) = v.get(i) {
                            out.push(*c);
                        }
                        i += 1;
                    } else {
                        i += len;
                    }
                }
                None => {
                    if let Some(c) = v.get(i) {
                        out.push(*c);
                    }
                    i += 1;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Env {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn words_expand_like_buildkit() {
        let e = env(&[
            ("V", "1.36"),
            ("EMPTY", ""),
            ("IMAGE", "nginx:1.27-alpine3.20"),
            ("PATH_", "a/b/a/b"),
        ]);
        let x = |w: &str| expand(w, &e, '\\');
        for (word, want) in [
            ("busybox:$V", "busybox:1.36"),
            ("busybox:${V}", "busybox:1.36"),
            ("${UNSET}x", "x"),
            ("${UNSET-latest}", "latest"),
            ("${EMPTY-latest}", ""),
            ("${EMPTY:-latest}", "latest"),
            ("${V-latest}", "1.36"),
            ("${V:+set}", "set"),
            ("${EMPTY:+set}", ""),
            ("${EMPTY+set}", "set"),
            ("${UNSET+set}", ""),
            ("${V:?required}", "1.36"),
            ("${IMAGE%-alpine*}", "nginx:1.27"),
            ("${IMAGE%%.*}", "nginx:1"),
            ("${IMAGE#*:}", "1.27-alpine3.20"),
            ("${IMAGE##*[}", "nginx:1.27-alpine3.20"),
            ("${IMAGE/1.27/1.26}", "nginx:1.26-alpine3.20"),
            ("${PATH_//a/x}", "x/b/x/b"),
            ("${PATH_/a/x}", "x/b/a/b"),
            ("${PATH_//*/x}", "x"),
            ("${PATH_//b*/x}", "a/x"),
            ("${PATH_/?\\//}", "b/a/b"),
            ("${PATH_%/*}", "a/b/a"),
            ("${PATH_%%/*}", "a"),
            ("${PATH_#*/}", "b/a/b"),
            ("${PATH_##*/}", "b"),
            ("${UNSET:-${V}}", "1.36"),
            ("'$V'", "$V"),
            ("\"$V\"", "1.36"),
            ("a\\$V", "a$V"),
            ("$", "$"),
            ("${V-a}${UNSET:-b}", "1.36b"),
        ] {
            assert_eq!(x(word).as_deref(), Ok(want), "{word}");
        }
        assert_eq!(
            expand("a`$V", &e, '`').as_deref(),
            Ok("a$V"),
            "the escape directive's character"
        );
        for (word, why) in [
            ("${UNSET:?is required}", "UNSET: is required"),
            ("${UNSET?}", "UNSET: is not allowed to be unset"),
            ("${EMPTY:?}", "EMPTY: is not allowed to be empty"),
            ("${V", "missing '}'"),
            ("${V:-x", "no matching '}'"),
            ("${}", "bad substitution"),
            ("${V!x}", "unsupported modifier"),
            ("'open", "single quote"),
        ] {
            let e = x(word).expect_err(word);
            assert!(e.contains(why), "{word}: {e}");
        }
    }
}
