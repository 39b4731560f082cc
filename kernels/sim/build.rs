//! Compiles every `kernels/*.cu` as host C++ (g++/clang++ through the `cc` crate) together with
//! the SIMT runtime of `src/*.cpp`.
//!
//! Each source is built in one or more variants, each a translation unit generated here:
//! - `""`: as the backend compiles it by default (bf16 tensor-core operands);
//! - `"f16"`: with `-DMINISAM_MMA_F16`, for sources that mention it;
//! - `"mutant"`: for sources with barriers, every `__syncthreads()` call numbered as a "site" that a
//!   launch may skip (`msim_options::skip_barrier_site`), so tests can prove a missing barrier fails.
//!
//! `probes/probes.cu` (kernels that test the simulator itself) is built as variant `"probe"`.
//!
//! The source text is included unchanged except for two mechanical edits on the same line (line
//! numbers stay right through `#line`): `MSIM_SHARED(name);` after each `__shared__` declaration
//! (see include/minisam_sim.h), and in the mutant variant the numbered barrier calls.
//!
//! Headers of the kernels' own (`kernels/*.cuh`, e.g. `tensor_core.cuh`, the tensor-core helpers
//! of attention.cu and nf4_gemm.cu) are reached by an ordinary `#include "name.cuh"` in the `.cu`,
//! resolved through `kernels/` on the include path: NVRTC gets the same text as an in-memory
//! header (models/src/cuda/compile.rs), and the compilers name the header's own file and lines.
//! The edits above apply to the `.cu` text only, so a header may hold neither `__shared__` nor
//! `__syncthreads` (checked here: a barrier in a header would silently escape the mutant build's
//! numbering), nor a kernel; a source counts as mentioning what its headers mention (the `"f16"`
//! variant of a source whose `MINISAM_MMA_F16` code sits in a header).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One `.cu` file as the generator sees it.
struct Source {
    /// File stem: the module name.
    module: String,
    path: PathBuf,
    text: String,
    /// Byte ranges of code (not comments, not string literals).
    code: Vec<bool>,
    kernels: Vec<String>,
    /// The text of the `kernels/*.cuh` headers it includes (`#include "name.cuh"`).
    headers: Vec<String>,
}

fn main() {
    let manifest = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let kernels_dir = manifest
        .parent()
        .expect("kernels/sim sits in kernels/")
        .to_path_buf();
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));

    let mut cu: Vec<PathBuf> = std::fs::read_dir(&kernels_dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", kernels_dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    cu.sort();
    // Cargo scans a directory named here for any modified file, which covers kernels/*.cu and the
    // headers they include; the headers are also named one by one, so that the dependency on
    // tensor_core.cuh stays explicit should the directory line ever narrow.
    println!("cargo:rerun-if-changed={}", kernels_dir.display());
    for entry in std::fs::read_dir(&kernels_dir).expect("kernels/ was just read") {
        let path = entry.expect("directory entry").path();
        if path.extension().is_some_and(|x| x == "cuh") {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    for dir in ["include", "src"] {
        println!("cargo:rerun-if-changed={}", manifest.join(dir).display());
    }

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .define("MINISAM_SIM", "1")
        .include(manifest.join("include"))
        // `#include "tensor_core.cuh"` in kernels/*.cu: the generated translation units live in
        // OUT_DIR, so the quoted form's own-directory lookup would not find kernels/.
        .include(&kernels_dir)
        // Only the kernels' explicit fmaf fuses: the same answer on x86-64 and aarch64 (GCC contracts
        // a*b+c by default on aarch64).
        .flag("-ffp-contract=off")
        .flag_if_supported("-Wno-unknown-pragmas")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(true);
    // The portable ucontext fibers instead of the x86-64 switch, to test that path on x86-64.
    println!("cargo:rerun-if-env-changed=MINISAM_SIM_UCONTEXT");
    if std::env::var_os("MINISAM_SIM_UCONTEXT").is_some() {
        build.define("MSIM_FIBER_UCONTEXT", "1");
    }
    for f in ["runtime.cpp", "fiber.cpp", "ptx.cpp"] {
        build.file(manifest.join("src").join(f));
    }

    let mut modules = Vec::new();
    for path in &cu {
        let source = Source::read(path);
        let mut variants = vec![""];
        if source.mentions("MINISAM_MMA_F16") {
            variants.push("f16");
        }
        if !source.find_code("__syncthreads").is_empty() {
            variants.push("mutant");
        }
        for variant in variants {
            let (symbol, file) = generate_variant(&source, variant, &out);
            build.file(file);
            modules.push(symbol);
        }
    }
    // The simulator's own test kernels (tests/gpu_sim/simulator.rs), one variant.
    let probes = manifest.join("probes").join("probes.cu");
    println!("cargo:rerun-if-changed={}", probes.display());
    let (symbol, file) = generate_variant(&Source::read(&probes), "probe", &out);
    build.file(file);
    modules.push(symbol);
    build.file(generate_registry(&modules, &out));
    build.compile("minisam_gpusim");
}

impl Source {
    fn read(path: &Path) -> Self {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let module = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("UTF-8 file name")
            .to_string();
        let code = code_mask(&text);
        let mut s = Source {
            module,
            path: path.to_path_buf(),
            text,
            code,
            kernels: Vec::new(),
            headers: Vec::new(),
        };
        s.kernels = s.kernel_names();
        s.headers = s.read_headers();
        s
    }

    /// The `kernels/*.cuh` files named by `#include "..."` lines (the `<...>` form names the
    /// simulator's stand-ins for CUDA headers in include/, which are not kernel code), each
    /// checked to hold nothing the per-line edits would have to see.
    fn read_headers(&self) -> Vec<String> {
        let dir = self.path.parent().expect("a source sits in a directory");
        let mut headers = Vec::new();
        for line in self.text.lines() {
            let Some(rest) = line.trim_start().strip_prefix("#include") else {
                continue;
            };
            let Some(name) = rest
                .trim()
                .strip_prefix('"')
                .and_then(|r| r.split('"').next())
            else {
                continue;
            };
            let path = dir.join(name);
            let header = Source::read(&path);
            for word in ["__shared__", "__syncthreads", "__global__"] {
                if let Some(&at) = header.find_code(word).first() {
                    panic!(
                        "{}:{}: `{word}` in a header: the simulator's build edits and scans the .cu text only (numbered barriers, MSIM_SHARED, kernel names); keep it in the .cu",
                        path.display(),
                        line_of(&header.text, at)
                    );
                }
            }
            headers.push(header.text);
            headers.extend(header.headers);
        }
        headers
    }

    fn mentions(&self, word: &str) -> bool {
        self.text.contains(word) || self.headers.iter().any(|h| h.contains(word))
    }

    /// Byte offsets of `word` where it stands as a whole identifier in code.
    fn find_code(&self, word: &str) -> Vec<usize> {
        let bytes = self.text.as_bytes();
        let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
        self.text
            .match_indices(word)
            .map(|(i, _)| i)
            .filter(|&i| self.code[i])
            .filter(|&i| {
                (i == 0 || !ident(bytes[i - 1]))
                    && bytes.get(i + word.len()).is_none_or(|&b| !ident(b))
            })
            .collect()
    }

    /// Names of the `__global__` functions: the identifier before the parameter list, skipping
    /// `__launch_bounds__(...)`.
    fn kernel_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for at in self.find_code("__global__") {
            let rest = &self.text[at + "__global__".len()..];
            let head_end = rest.find(['{', ';']).unwrap_or_else(|| {
                panic!(
                    "{}: a __global__ declaration without a body",
                    self.path.display()
                )
            });
            let mut head = rest[..head_end].to_string();
            if let Some(lb) = head.find("__launch_bounds__") {
                let open = lb + head[lb..].find('(').expect("__launch_bounds__(");
                let close = open + matching_paren(&head[open..]);
                head.replace_range(lb..=close, " ");
            }
            let paren = head.find('(').unwrap_or_else(|| {
                panic!(
                    "{}: no parameter list after __global__",
                    self.path.display()
                )
            });
            let name: String = head[..paren]
                .trim_end()
                .chars()
                .rev()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
                .chars()
                .rev()
                .collect();
            assert!(
                !name.is_empty(),
                "{}: cannot find a kernel name in `__global__{}`",
                self.path.display(),
                &head[..paren]
            );
            names.push(name);
        }
        names
    }

    /// Brace depth at byte `at`, counting code only.
    fn depth_at(&self, at: usize) -> i32 {
        let bytes = self.text.as_bytes();
        (0..at)
            .filter(|&i| self.code[i])
            .map(|i| (bytes[i] == b'{') as i32 - (bytes[i] == b'}') as i32)
            .sum()
    }
}

/// Offset of the parenthesis closing the one at `s[0]`.
fn matching_paren(s: &str) -> usize {
    let mut depth = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced parentheses in `{s}`")
}

/// Which bytes are code: false inside comments and string or character literals.
fn code_mask(text: &str) -> Vec<bool> {
    let b = text.as_bytes();
    let mut mask = vec![true; b.len()];
    let mut i = 0;
    while i < b.len() {
        let start = i;
        let end = if b[i..].starts_with(b"//") {
            b[i..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(b.len(), |p| i + p)
        } else if b[i..].starts_with(b"/*") {
            b[i + 2..]
                .windows(2)
                .position(|w| w == b"*/")
                .map_or(b.len(), |p| i + 2 + p + 2)
        } else if b[i] == b'"' || b[i] == b'\'' {
            let quote = b[i];
            let mut j = i + 1;
            while j < b.len() && b[j] != quote {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            (j + 1).min(b.len())
        } else {
            i += 1;
            continue;
        };
        mask[start..end].iter_mut().for_each(|m| *m = false);
        i = end;
    }
    mask
}

fn line_of(text: &str, at: usize) -> usize {
    text[..at].bytes().filter(|&c| c == b'\n').count() + 1
}

/// Writes the translation unit of one variant; returns its module symbol and path.
fn generate_variant(src: &Source, variant: &str, out: &Path) -> (String, PathBuf) {
    let tag = if variant.is_empty() {
        "default"
    } else {
        variant
    };
    let prefix = format!("msim_{}_{}", src.module, tag);

    // Edits, applied back to front so offsets stay valid: (offset, bytes removed, replacement).
    let mut edits: Vec<(usize, usize, String)> = Vec::new();
    for at in src.find_code("__shared__") {
        let end = at
            + src.text[at..].find(';').unwrap_or_else(|| {
                panic!(
                    "{}: unterminated __shared__ declaration",
                    src.path.display()
                )
            });
        assert!(
            src.depth_at(at) > 0,
            "{}:{}: a namespace-scope __shared__ variable: the simulator handles __shared__ declared inside functions only",
            src.path.display(),
            line_of(&src.text, at)
        );
        let decl = &src.text[at + "__shared__".len()..end];
        let decl = decl.split('=').next().unwrap_or(decl);
        let decl = decl.split('[').next().unwrap_or(decl).trim_end();
        let name: String = decl
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect::<String>()
            .chars()
            .rev()
            .collect();
        assert!(
            !name.is_empty(),
            "{}:{}: cannot find the name of a __shared__ variable",
            src.path.display(),
            line_of(&src.text, at)
        );
        edits.push((end + 1, 0, format!(" MSIM_SHARED({name});")));
    }
    let mut site_lines = Vec::new();
    if variant == "mutant" {
        for (site, at) in src.find_code("__syncthreads").into_iter().enumerate() {
            let call = &src.text[at..];
            let open = call.find('(').expect("__syncthreads(");
            let close = matching_paren(&call[open..]) + open;
            edits.push((at, close + 1, format!("::msim::syncthreads({site})")));
            site_lines.push(line_of(&src.text, at));
        }
    }
    edits.sort_by_key(|e| std::cmp::Reverse(e.0));
    let mut text = src.text.clone();
    for (at, len, with) in edits {
        text.replace_range(at..at + len, &with);
    }

    let mut tu = String::new();
    writeln!(
        tu,
        "// Generated by kernels/sim/build.rs from {}, variant {tag:?}.",
        src.path.display()
    )
    .unwrap();
    writeln!(
        tu,
        "#include \"minisam_sim.h\"\n#include \"minisam_sim_module.h\""
    )
    .unwrap();
    if variant == "f16" {
        writeln!(tu, "#define MINISAM_MMA_F16 1").unwrap();
    }
    for k in &src.kernels {
        writeln!(tu, "#define {k} {prefix}__{k}").unwrap();
    }
    writeln!(tu, "namespace {{\n#line 1 \"{}\"", src.path.display()).unwrap();
    tu.push_str(&text);
    writeln!(tu, "\n}}  // namespace").unwrap();
    writeln!(tu, "namespace {{").unwrap();
    let lines: Vec<String> = site_lines
        .iter()
        .map(|l| l.to_string())
        .chain(["0".into()])
        .collect();
    writeln!(
        tu,
        "const uint32_t barrier_lines[] = {{{}}};",
        lines.join(", ")
    )
    .unwrap();
    writeln!(tu, "const msim::KernelEntry kernels[] = {{").unwrap();
    for k in &src.kernels {
        writeln!(tu, "    msim::entry(\"{k}\", &{k}),").unwrap();
    }
    writeln!(tu, "}};\n}}  // namespace").unwrap();
    writeln!(
        tu,
        "extern \"C\" const msim::Module {prefix} = {{\"{}\", \"{variant}\", kernels, {}, barrier_lines, {}}};",
        src.module,
        src.kernels.len(),
        site_lines.len()
    )
    .unwrap();
    let path = out.join(format!("{prefix}.cpp"));
    write_if_changed(&path, &tu);
    (prefix, path)
}

/// The table of every module, which also makes the linker keep each module's object file.
fn generate_registry(modules: &[String], out: &Path) -> PathBuf {
    let mut tu = String::from("// Generated by kernels/sim/build.rs: every compiled kernels/*.cu variant.\n#include \"minisam_sim_module.h\"\n");
    for m in modules {
        writeln!(tu, "extern \"C\" const msim::Module {m};").unwrap();
    }
    writeln!(
        tu,
        "extern \"C\" const msim::Module* const msim_modules[] = {{"
    )
    .unwrap();
    for m in modules {
        writeln!(tu, "    &{m},").unwrap();
    }
    writeln!(
        tu,
        "}};\nextern \"C\" const size_t msim_module_count = {};",
        modules.len()
    )
    .unwrap();
    let path = out.join("msim_registry.cpp");
    write_if_changed(&path, &tu);
    path
}

fn write_if_changed(path: &Path, text: &str) {
    if std::fs::read_to_string(path).ok().as_deref() != Some(text) {
        std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
}
