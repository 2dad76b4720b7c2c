//! Errors of the JIT: one enum for everything that crosses the crate boundary.

use std::fmt;
use std::path::PathBuf;

use crate::render::RenderError;
use crate::spec::SpecError;

#[derive(Clone, Debug, thiserror::Error)]
pub enum JitError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Render(std::sync::Arc<RenderError>),
    #[error("NVRTC 13 (libnvrtc.so.13) was not found; searched: {}. Hint: install the CUDA 13 toolkit, or run scripts/install-nvrtc.sh and set TWILIGHT_NVRTC_DIR to the directory it prints", searched.join(", "))]
    NvrtcMissing { searched: Vec<String> },
    #[error("NVRTC {}.{} found{} but twilight needs NVRTC 13.x. Hint: set TWILIGHT_NVRTC_DIR to a CUDA 13 lib directory", found.0, found.1, lib_dir.as_ref().map(|d| format!(" in {}", d.display())).unwrap_or_default())]
    NvrtcVersion {
        found: (i32, i32),
        lib_dir: Option<PathBuf>,
    },
    #[error("NVRTC call {what} failed: {message}")]
    Nvrtc { what: String, message: String },
    #[error(transparent)]
    Compile(Box<CompileFailure>),
    #[error("the CUDA driver (libcuda.so.1) was not found. Hint: twilight needs an NVIDIA driver for CUDA 13 to run kernels; rendering, precompiling with --arch and the CPU reference work without one")]
    DriverMissing,
    #[error("CUDA driver error while {what}: {message}")]
    Driver { what: String, message: String },
    #[error("variant {variant} is not in any kernel cache and TWILIGHT_JIT_DISABLE=1 forbids compiling it (key {key})")]
    JitDisabled { variant: String, key: String },
}

impl From<RenderError> for JitError {
    fn from(e: RenderError) -> Self {
        JitError::Render(std::sync::Arc::new(e))
    }
}

impl JitError {
    pub(crate) fn driver(what: impl Into<String>, e: impl fmt::Display) -> JitError {
        JitError::Driver {
            what: what.into(),
            message: e.to_string(),
        }
    }
}

/// A failed NVRTC compile: the variant, the options, the log, and the rendered source around
/// every line the log reports.
#[derive(Clone, Debug)]
pub struct CompileFailure {
    pub variant: String,
    pub options: Vec<String>,
    pub log: String,
    /// `(file, line, excerpt)` for each location the log names.
    pub excerpts: Vec<(String, usize, String)>,
}

/// Lines of context shown on each side of a reported line.
const CONTEXT_LINES: usize = 3;

impl CompileFailure {
    /// `variant` also names the program as NVRTC saw it: `<variant>.cu`.
    pub fn new(variant: String, options: Vec<String>, log: String, source: &str) -> Self {
        let program = format!("{variant}.cu");
        let excerpts = reported_locations(&log)
            .into_iter()
            .filter_map(|(file, line)| {
                excerpt(source, &program, &file, line).map(|text| (file.clone(), line, text))
            })
            .collect();
        CompileFailure {
            variant,
            options,
            log,
            excerpts,
        }
    }
}

impl fmt::Display for CompileFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "NVRTC failed to compile variant {}", self.variant)?;
        writeln!(f, "  options: {}", self.options.join(" "))?;
        writeln!(f, "  log:")?;
        for line in self.log.lines() {
            writeln!(f, "    {line}")?;
        }
        for (file, line, text) in &self.excerpts {
            writeln!(f, "  {file}:{line}:")?;
            f.write_str(text)?;
        }
        write!(
            f,
            "  (`twilight render {}` prints the whole source)",
            self.variant
        )
    }
}

impl std::error::Error for CompileFailure {}

/// `(file, line)` of every `file(line): ...` location in an NVRTC log, in order, once each.
fn reported_locations(log: &str) -> Vec<(String, usize)> {
    let mut out: Vec<(String, usize)> = Vec::new();
    for line in log.lines() {
        let Some(open) = line.find('(') else { continue };
        let Some(close) = line[open..].find("):").map(|c| c + open) else {
            continue;
        };
        let Ok(number) = line[open + 1..close].parse::<usize>() else {
            continue;
        };
        let location = (line[..open].to_string(), number);
        if !out.contains(&location) {
            out.push(location);
        }
    }
    out
}

/// The rendered lines around `line` of `file`, found through the `#line 1 "file"` markers.
/// `program` (the name NVRTC was given) is numbered from the first line of the source; a file
/// with neither (a CUDA header) has no excerpt. An excerpt never runs past its own file.
fn excerpt(source: &str, program: &str, file: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = source.lines().collect();
    let is_marker = |l: &&str| l.trim_start().starts_with("#line ");
    let marker = format!("#line 1 \"{file}\"");
    let first = if file == program {
        0
    } else {
        lines.iter().position(|l| l.trim() == marker)? + 1
    };
    let end = lines[first..]
        .iter()
        .position(is_marker)
        .map_or(lines.len(), |at| first + at);
    let target = first + line.checked_sub(1)?;
    if target >= end {
        return None;
    }
    let from = target.saturating_sub(CONTEXT_LINES).max(first);
    let to = (target + CONTEXT_LINES + 1).min(end);
    let mut text = String::new();
    for (i, l) in lines.iter().enumerate().take(to).skip(from) {
        let mark = if i == target { ">" } else { " " };
        text.push_str(&format!("   {mark}{:5} | {l}\n", i - first + 1));
    }
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpt_follows_line_markers() {
        let source = "// banner\n#line 1 \"twilight/a.cuh\"\nint a;\nint b;\nint c;\n#line 1 \"x.cu.tera\"\nbad here;\n";
        let log = "x.cu.tera(1): error: identifier \"bad\" is undefined\n1 error detected";
        let failure =
            CompileFailure::new("v".into(), vec!["--std=c++17".into()], log.into(), source);
        assert_eq!(failure.excerpts.len(), 1);
        assert!(
            failure.excerpts[0].2.contains(">    1 | bad here;"),
            "{:?}",
            failure.excerpts
        );
        let shown = failure.to_string();
        assert!(
            shown.contains("variant v")
                && shown.contains("--std=c++17")
                && shown.contains("is undefined")
        );
        let in_header = CompileFailure::new(
            "v".into(),
            vec![],
            "twilight/a.cuh(2): error: x".into(),
            source,
        );
        assert!(in_header.excerpts[0].2.contains(">    2 | int b;"));
    }
}
