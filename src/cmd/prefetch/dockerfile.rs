//! Which images a Dockerfile build pulls, read the way BuildKit reads it, for `regcache prefetch`.
//!
//! The file is split into instructions like BuildKit's parser does: parser directives (`escape`),
//! continuation lines, comment lines, and heredocs (`RUN <<EOF`, `COPY <<-"EOF"`, several on one
//! line), whose bodies are never instructions. Words are split and expanded like BuildKit's shell
//! lexer does ([`super::shell`]).
//!
//! A build has a target platform. [`images`] reads the file for one: BuildKit's automatic platform
//! arguments (`TARGETPLATFORM`, `TARGETOS`, `TARGETARCH`, `TARGETVARIANT`, and the `BUILD…` ones
//! for the machine that builds) are set from it before the global `ARG`s, a `FROM` without
//! `--platform` pulls for it, and `COPY --from=IMAGE` and `RUN --mount=…,from=IMAGE` pull for their
//! stage's platform.

use std::collections::HashMap;

use crate::cmd::prefetch::shell::{expand, split_words, Env};
use crate::cmd::prefetch::Platform;
use crate::oci::reference::ImageRef;

/// An image the build pulls, for one platform, and the line that names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub image: String,
    pub platform: Platform,
    pub line: usize,
}

/// One instruction: its keyword (upper case), its arguments (continuations joined, heredoc
/// bodies left out) and its first line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Instruction {
    keyword: String,
    args: String,
    line: usize,
}

/// The instructions of `text` and its escape character.
fn instructions(text: &str) -> Result<(Vec<Instruction>, char), String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
    let mut escape = '\\';
    // Parser directives: `# key=value` lines at the very top; anything else ends them.
    for line in &lines {
        let Some(directive) = line.trim().strip_prefix('#') else {
            break;
        };
        let Some((key, value)) = directive.split_once('=') else {
            break;
        };
        let key = key.trim().to_ascii_lowercase();
        match key.as_str() {
            "escape" => {
                escape = match value.trim() {
                    "`" => '`',
                    "\\" => '\\',
                    v => return Err(format!("invalid escape directive {v:?} (use \\ or `)")),
                }
            }
            "syntax" | "check" => {}
            _ => break,
        }
    }
    let continues = |line: &str| -> Option<usize> {
        let t = line.trim_end_matches([' ', '\t']);
        t.ends_with(escape).then(|| t.len() - escape.len_utf8())
    };
    let is_comment = |line: &str| line.trim_start().starts_with('#');

    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let start = i + 1;
        let first = lines[i].trim_start();
        i += 1;
        if first.is_empty() || is_comment(first) {
            continue;
        }
        let mut logical = String::new();
        let mut more = match continues(first) {
            Some(end) => {
                logical.push_str(&first[..end]);
                true
            }
            None => {
                logical.push_str(first);
                false
            }
        };
        // Continuation lines keep their leading blanks; comment and empty lines inside are
        // skipped, as BuildKit does.
        while more && i < lines.len() {
            let line = lines[i];
            i += 1;
            if is_comment(line) || line.trim().is_empty() {
                continue;
            }
            match continues(line) {
                Some(end) => logical.push_str(&line[..end]),
                None => {
                    logical.push_str(line);
                    more = false;
                }
            }
        }
        let logical = logical.trim().to_owned();
        if logical.is_empty() {
            continue;
        }
        let (keyword, args) = logical
            .split_once(char::is_whitespace)
            .unwrap_or((logical.as_str(), ""));
        let keyword = keyword.to_ascii_uppercase();
        if matches!(keyword.as_str(), "RUN" | "COPY" | "ADD") && args.contains("<<") {
            for (name, chomp) in heredocs(args) {
                let mut terminated = false;
                while i < lines.len() {
                    let body = lines[i];
                    i += 1;
                    let candidate = if chomp {
                        body.trim_start_matches('\t')
                    } else {
                        body
                    };
                    if candidate == name {
                        terminated = true;
                        break;
                    }
                }
                if !terminated {
                    return Err(format!(
                        "line {start}: heredoc <<{name} is not terminated by a line {name:?}"
                    ));
                }
            }
        }
        out.push(Instruction {
            args: args.trim().to_owned(),
            keyword,
            line: start,
        });
    }
    Ok((out, escape))
}

/// The heredocs an instruction opens (`<<EOF`, `<<-EOF`, `2<<"EOF"`), in order: each name, and
/// whether leading tabs are stripped (`<<-`). Words are split like BuildKit's lexer with quotes
/// kept, so `"<<EOF"` or `'a<<b'` open nothing.
fn heredocs(args: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    for word in split_words(args, '\\') {
        let rest = word.trim_start_matches(|c: char| c.is_ascii_digit());
        let Some(rest) = rest.strip_prefix("<<") else {
            continue;
        };
        let (chomp, rest) = match rest.strip_prefix('-') {
            Some(r) => (true, r),
            None => (false, rest),
        };
        // The name is the word without its quotes: `"EOF"`, `'EOF'`, `E"O"F` all name EOF.
        let name: String = rest.chars().filter(|c| *c != '"' && *c != '\'').collect();
        if !name.is_empty() {
            out.push((name, chomp));
        }
    }
    out
}

/// BuildKit's automatic platform arguments for a build for `target` on a machine of `build`.
fn platform_args(target: &Platform, build: &Platform) -> Env {
    let mut env = Env::new();
    for (prefix, p) in [("TARGET", target), ("BUILD", build)] {
        // An `arm` platform without a variant is arm/v7, as containerd normalises it.
        let variant = match (&p.variant, p.arch.as_str()) {
            (Some(v), _) => v.clone(),
            (None, "arm") => "v7".into(),
            (None, _) => String::new(),
        };
        env.insert(format!("{prefix}PLATFORM"), p.to_string());
        env.insert(format!("{prefix}OS"), p.os.clone());
        env.insert(format!("{prefix}ARCH"), p.arch.clone());
        env.insert(format!("{prefix}VARIANT"), variant);
    }
    env
}

/// `--name=value` flags at the start of an instruction's arguments, and the remaining words.
fn flags(args: &str, escape: char) -> (Vec<(String, String)>, Vec<String>) {
    let mut words = split_words(args, escape).into_iter().peekable();
    let mut flags = Vec::new();
    while let Some(w) = words.next_if(|w| w.starts_with("--")) {
        let (k, v) = w[2..].split_once('=').unwrap_or((&w[2..], ""));
        flags.push((k.to_ascii_lowercase(), v.to_owned()));
    }
    (flags, words.collect())
}

/// A build stage seen so far.
struct Stage {
    name: Option<String>,
    platform: Platform,
    /// `ENV` values, which a stage built `FROM` this one inherits.
    env: Env,
}

/// Every image a build of `text` for `target` on a `build` machine pulls, with its platform:
/// `FROM` images (not `scratch`, not earlier stages), `COPY --from=IMAGE` and
/// `RUN --mount=…,from=IMAGE`. `build_args` override the defaults of declared `ARG`s. Errors name
/// the line.
pub fn images(
    text: &str,
    build_args: &HashMap<String, String>,
    target: &Platform,
    build: &Platform,
) -> Result<Vec<Image>, String> {
    let (instructions, escape) = instructions(text)?;
    let mut globals = platform_args(target, build);
    let mut stages: Vec<Stage> = Vec::new();
    let mut out = Vec::new();
    // The stage a `--from` names, if it names one (by name or index).
    let stage_of = |stages: &[Stage], from: &str| -> bool {
        from.parse::<usize>().is_ok_and(|i| i < stages.len())
            || stages
                .iter()
                .any(|s| s.name.as_deref() == Some(from.to_ascii_lowercase().as_str()))
    };
    for ins in instructions {
        let line = ins.line;
        let at = |e: String| format!("line {line}: {e}");
        match ins.keyword.as_str() {
            "ARG" => {
                for decl in split_words(&ins.args, escape) {
                    let (name, default) = match decl.split_once('=') {
                        Some((n, d)) => (n.to_owned(), Some(d.to_owned())),
                        None => (decl.clone(), None),
                    };
                    let scope = stages.last().map_or(&globals, |s| &s.env);
                    let value = match (build_args.get(&name), default) {
                        (Some(v), _) => Some(v.clone()),
                        (None, Some(d)) => Some(expand(&d, scope, escape).map_err(at)?),
                        // Declared without a default: a global keeps its value (an automatic
                        // platform argument), a stage takes the global one.
                        (None, None) if !stages.is_empty() => globals.get(&name).cloned(),
                        (None, None) => None,
                    };
                    if let Some(v) = value {
                        match stages.last_mut() {
                            Some(s) => s.env.insert(name, v),
                            None => globals.insert(name, v),
                        };
                    }
                }
            }
            "ENV" => {
                let Some(stage) = stages.last_mut() else {
                    continue;
                };
                let words = split_words(&ins.args, escape);
                if words.first().is_some_and(|w| w.contains('=')) {
                    for w in words {
                        if let Some((k, v)) = w.split_once('=') {
                            let v = expand(v, &stage.env, escape).map_err(at)?;
                            stage.env.insert(k.to_owned(), v);
                        }
                    }
                } else if let Some((k, v)) = ins.args.split_once(char::is_whitespace) {
                    let v = expand(v.trim(), &stage.env, escape).map_err(at)?;
                    stage.env.insert(k.to_owned(), v);
                }
            }
            "FROM" => {
                let (flags, words) = flags(&ins.args, escape);
                let Some(base) = words.first() else {
                    return Err(at("FROM without an image".into()));
                };
                let image = expand(base, &globals, escape).map_err(at)?;
                if image.is_empty() {
                    return Err(at(format!(
                        "the image {base:?} is empty after substituting ARGs"
                    )));
                }
                let parent = stages
                    .iter()
                    .rev()
                    .find(|s| s.name.as_deref() == Some(image.to_ascii_lowercase().as_str()));
                let platform = match flags.iter().find(|(k, _)| k == "platform") {
                    Some((_, p)) => {
                        let value = expand(p, &globals, escape).map_err(at)?;
                        if value.is_empty() {
                            return Err(at(format!(
                                "--platform={p} is empty after substituting ARGs"
                            )));
                        }
                        Platform::parse(&value).map_err(|e| at(format!("--platform={p}: {e}")))?
                    }
                    None => parent.map_or_else(|| target.clone(), |s| s.platform.clone()),
                };
                let env = parent.map(|s| s.env.clone()).unwrap_or_default();
                if parent.is_none() && !image.eq_ignore_ascii_case("scratch") {
                    ImageRef::parse(&image).map_err(|e| at(e.to_string()))?;
                    out.push(Image {
                        image,
                        platform: platform.clone(),
                        line,
                    });
                }
                let name = match words.as_slice() {
                    [_, as_, name, ..] if as_.eq_ignore_ascii_case("as") => {
                        Some(name.to_ascii_lowercase())
                    }
                    _ => None,
                };
                stages.push(Stage {
                    name,
                    platform,
                    env,
                });
            }
            "COPY" | "ADD" | "RUN" => {
                let Some(stage) = stages.last() else {
                    return Err(at(format!("{} before the first FROM", ins.keyword)));
                };
                let (flags, _) = flags(&ins.args, escape);
                let mut sources = Vec::new();
                for (k, v) in &flags {
                    match (ins.keyword.as_str(), k.as_str()) {
                        // BuildKit takes `--from` as written: no variables.
                        ("COPY" | "ADD", "from") => sources.push(v.clone()),
                        ("RUN", "mount") => {
                            let mount = expand(v, &stage.env, escape).map_err(at)?;
                            sources.extend(
                                mount
                                    .split(',')
                                    .filter_map(|kv| kv.trim().strip_prefix("from="))
                                    .map(str::to_owned),
                            );
                        }
                        _ => {}
                    }
                }
                for from in sources {
                    if stage_of(&stages, &from) || from.eq_ignore_ascii_case("scratch") {
                        continue;
                    }
                    if from.contains('$') {
                        return Err(at(format!(
                            "--from={from}: BuildKit does not substitute variables in --from"
                        )));
                    }
                    ImageRef::parse(&from).map_err(|e| at(e.to_string()))?;
                    out.push(Image {
                        image: from,
                        platform: stage.platform.clone(),
                        line,
                    });
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linux(arch: &str) -> Platform {
        Platform::parse(&format!("linux/{arch}")).expect("platform")
    }

    /// The error reading `text` for linux/amd64 gives.
    fn error_of(text: &str) -> String {
        let amd64 = linux("amd64");
        images(text, &HashMap::new(), &amd64, &amd64).expect_err(text)
    }

    fn list(text: &str, target: &Platform) -> Vec<(String, String)> {
        images(text, &HashMap::new(), target, &linux("amd64"))
            .expect("parses")
            .into_iter()
            .map(|i| (i.image, i.platform.to_string()))
            .collect()
    }

    #[test]
    fn automatic_platform_args_follow_the_target() {
        let text = "ARG TARGETARCH\n\
                    FROM --platform=linux/${TARGETARCH} busybox:1.36 AS a\n\
                    FROM --platform=${TARGETOS}/${TARGETARCH}${TARGETVARIANT:+/$TARGETVARIANT} alpine:3.20\n\
                    FROM --platform=$BUILDPLATFORM golang:1.22 AS build\n\
                    FROM --platform=$TARGETPLATFORM debian:12\n\
                    COPY --from=build /out /out\n\
                    COPY --from=tonistiigi/xx:1.4.0 / /\n";
        let arm = Platform::parse("linux/arm/v7").expect("platform");
        assert_eq!(
            list(text, &arm),
            vec![
                ("busybox:1.36".into(), "linux/arm".into()),
                ("alpine:3.20".into(), "linux/arm/v7".into()),
                ("golang:1.22".into(), "linux/amd64".into()),
                ("debian:12".into(), "linux/arm/v7".into()),
                ("tonistiigi/xx:1.4.0".into(), "linux/arm/v7".into()),
            ]
        );
    }

    #[test]
    fn heredoc_bodies_are_not_instructions() {
        let text = "FROM debian:12\n\
                    RUN <<EOF\nFROM users WHERE x\nFROM\nEOF\n\
                    COPY <<-\"SQL\" /init.sql\n\tFROM nothing:here\n\tSQL\n\
                    RUN <<one cat >/a && <<'two' cat >/b\nFROM alpine\none\nFROM bad name\ntwo\n\
                    RUN echo \"<<NOT\" '<<HEREDOC'\n\
                    RUN --mount=type=cache,target=/c \\\n  <<EOF bash\nFROM x\nEOF\n\
                    FROM busybox\n";
        assert_eq!(
            list(text, &linux("amd64")),
            vec![
                ("debian:12".into(), "linux/amd64".into()),
                ("busybox".into(), "linux/amd64".into()),
            ]
        );
        let e = error_of("FROM a\nRUN <<EOF\nno end\n");
        assert!(e.contains("line 2") && e.contains("EOF"), "{e}");
    }

    #[test]
    fn global_args_build_args_stages_and_scratch() {
        let text = r#"
# syntax=docker/dockerfile:1
ARG BASE=alpine
ARG VERSION="3.20"
ARG GO
FROM golang:${GO:-1.22} AS build
RUN echo hi \
    && echo there
FROM --platform=linux/arm64 $BASE:${VERSION} as runtime
COPY --from=build /out /out
COPY --from=busybox:1.36 /bin/busybox /bin/
FROM scratch
FROM runtime
FROM Build
"#;
        let amd64 = linux("amd64");
        assert_eq!(
            list(text, &amd64),
            vec![
                ("golang:1.22".into(), "linux/amd64".into()),
                ("alpine:3.20".into(), "linux/arm64".into()),
                ("busybox:1.36".into(), "linux/arm64".into()),
            ]
        );
        let args: HashMap<String, String> = [("VERSION", "3.19"), ("GO", "1.21")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let with_args = images(text, &args, &amd64, &amd64).expect("parses");
        assert_eq!(with_args[0].image, "golang:1.21");
        assert_eq!(with_args[1].image, "alpine:3.19");
    }

    #[test]
    fn continuations_comments_and_the_escape_directive() {
        let text = "# escape=`\nFROM `\n  --platform=$BUILDPLATFORM `\n  # a comment inside\n  debian:12 `\n  AS base\nFROM base\n";
        assert_eq!(
            list(text, &linux("arm64")),
            vec![("debian:12".into(), "linux/amd64".into())]
        );
        let text = "FROM \\\n  --platform=linux/amd64 \\\n\n  ubuntu:24.04\n";
        assert_eq!(
            list(text, &linux("arm64")),
            vec![("ubuntu:24.04".into(), "linux/amd64".into())]
        );
        // A continuation joins without a blank, as BuildKit does.
        assert_eq!(
            list("FROM ubuntu:\\\n24.04\n", &linux("amd64")),
            vec![("ubuntu:24.04".into(), "linux/amd64".into())]
        );
    }

    #[test]
    fn errors_name_the_line() {
        let amd64 = linux("amd64");
        let e = error_of("FROM\n");
        assert!(e.contains("line 1"), "{e}");
        let e = error_of("ARG X\nFROM $X\n");
        assert!(e.contains("line 2") && e.contains("empty"), "{e}");
        let e = error_of("FROM Bad Name\n");
        assert!(e.contains("line 1"), "{e}");
        let e = error_of("\nARG V\nFROM busybox:${V:?set_a_tag}\n");
        assert!(e.contains("line 3") && e.contains("V: set_a_tag"), "{e}");
        let e = error_of("ARG P\nFROM --platform=$P alpine\n");
        assert!(e.contains("line 2") && e.contains("--platform"), "{e}");
        let e = error_of("FROM --platform=linux/ alpine\n");
        assert!(e.contains("line 1") && e.contains("linux/"), "{e}");
        // A stage name that was never defined is an image to pull.
        assert_eq!(
            list("FROM unknownstage\n", &amd64),
            vec![("unknownstage".into(), "linux/amd64".into())]
        );
    }

    #[test]
    fn stages_env_and_mounts() {
        let text = "ARG BASE=alpine:3.20\n\
                    FROM $BASE AS base\n\
                    ENV TOOL=busybox:1.36\n\
                    ARG BASE\n\
                    FROM base AS next\n\
                    RUN --mount=type=bind,from=$TOOL,source=/bin,target=/t true\n\
                    RUN --mount=type=bind,from=base,target=/b true\n\
                    COPY --from=0 / /\n\
                    COPY --from=NEXT / /\n\
                    FROM scratch\n";
        assert_eq!(
            list(text, &linux("arm64")),
            vec![
                ("alpine:3.20".into(), "linux/arm64".into()),
                ("busybox:1.36".into(), "linux/arm64".into()),
            ]
        );
        let e = error_of("FROM a\nCOPY --from=$X / /\n");
        assert!(e.contains("line 2"), "{e}");
    }
}
