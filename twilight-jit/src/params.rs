//! One launch contract per kernel: every kernel entry takes a single `#[repr(C)]` parameter
//! struct by value, and both of its spellings come from one field list.
//!
//! `kernel_params!` declares the Rust struct; the C++ twin is rendered from the same list
//! ([`KernelParams::cpp_definition`]) into every program, followed by `static_assert`s of the
//! struct's size and of every field's size and alignment as Rust laid them out. Both sides
//! then place the same fields, in the same order, by the same C layout rule, so every offset
//! agrees (NVRTC has no `offsetof` to check them one by one; each field's Rust offset is
//! written beside it for a reader). A field in the wrong order or of the wrong type cannot
//! reach a kernel: it either never compiles in Rust or fails the CUDA compile naming the field.
//!
//! Pointer fields are typed ([`ConstPtr`], [`MutPtr`]) by what they point at; [`Elem`] stands
//! for the variant's dtype (checked against the tensors where they are bound). A null pointer
//! marks a buffer the variant's kernel never touches.

use std::fmt::Write as _;
use std::marker::PhantomData;

use crate::render::Stage;

/// The variant's element type (`__half` or `__nv_bfloat16`) in a pointer field.
#[derive(Clone, Copy, Debug)]
pub enum Elem {}

/// A device pointer the kernel only reads.
#[repr(transparent)]
pub struct ConstPtr<T>(u64, PhantomData<fn() -> T>);

/// A device pointer the kernel writes.
#[repr(transparent)]
pub struct MutPtr<T>(u64, PhantomData<fn() -> T>);

macro_rules! pointer_common {
    ($ptr:ident) => {
        impl<T> $ptr<T> {
            /// A buffer the kernel does not touch.
            pub const NULL: $ptr<T> = $ptr(0, PhantomData);

            /// Wraps a raw device address.
            ///
            /// # Safety
            /// `address` is 0 or a device allocation of the launch's context holding as many
            /// elements of `T` as the kernel indexes, alive until the launch completes.
            pub const unsafe fn from_raw(address: u64) -> $ptr<T> {
                $ptr(address, PhantomData)
            }

            pub const fn address(self) -> u64 {
                self.0
            }

            pub const fn is_null(self) -> bool {
                self.0 == 0
            }
        }
        impl<T> Clone for $ptr<T> {
            fn clone(&self) -> Self {
                *self
            }
        }
        impl<T> Copy for $ptr<T> {}
        impl<T> Default for $ptr<T> {
            fn default() -> Self {
                $ptr::NULL
            }
        }
        impl<T> std::fmt::Debug for $ptr<T> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}
pointer_common!(ConstPtr);
pointer_common!(MutPtr);

/// A Rust field type with a C++ spelling; `elem` is the variant's dtype in C++.
pub trait CppType {
    fn cpp(elem: &str) -> String;
}

macro_rules! scalar_cpp {
    ($($t:ty => $cpp:literal),* $(,)?) => {
        $(impl CppType for $t {
            fn cpp(_: &str) -> String {
                $cpp.to_string()
            }
        })*
    };
}
scalar_cpp!(i32 => "int", u32 => "unsigned int", f32 => "float", u8 => "unsigned char",
            half::f16 => "half");

impl CppType for Elem {
    fn cpp(elem: &str) -> String {
        elem.to_string()
    }
}

impl<T: CppType> CppType for ConstPtr<T> {
    fn cpp(elem: &str) -> String {
        format!("const {}*", T::cpp(elem))
    }
}

impl<T: CppType> CppType for MutPtr<T> {
    fn cpp(elem: &str) -> String {
        format!("{}*", T::cpp(elem))
    }
}

/// One field of a parameter struct as Rust laid it out.
#[derive(Clone, Copy, Debug)]
pub struct ParamField {
    pub name: &'static str,
    pub cpp: fn(&str) -> String,
    pub offset: usize,
    pub size: usize,
    pub align: usize,
}

/// A kernel's parameter struct.
pub trait KernelParams: Copy {
    /// The C++ struct name.
    const CPP_NAME: &'static str;
    /// Every field, in declaration order.
    fn fields() -> Vec<ParamField>;

    /// The C++ twin for a program whose dtype is spelled `elem`, with compile-time checks of
    /// its size and of every field's size and alignment against the Rust layout.
    fn cpp_definition(elem: &str) -> String {
        let name = Self::CPP_NAME;
        let mut text = format!("struct {name} {{\n");
        for field in Self::fields() {
            let declaration = format!("{} {};", (field.cpp)(elem), field.name);
            let _ = writeln!(text, "  {declaration:<40} // offset {}", field.offset);
        }
        text.push_str("};\n");
        let _ = writeln!(
            text,
            "static_assert(sizeof({name}) == {}, \"{name}: size differs from the Rust struct\");",
            std::mem::size_of::<Self>()
        );
        for field in Self::fields() {
            let _ = writeln!(
                text,
                "static_assert(sizeof({name}::{f}) == {s} && alignof(decltype({name}::{f})) == {a}, \"{name}.{f}: differs from the Rust field\");",
                f = field.name,
                s = field.size,
                a = field.align
            );
        }
        text
    }
}

/// Declares a kernel's parameter struct: `#[repr(C)]` in Rust, with its C++ name and field list.
macro_rules! kernel_params {
    ($(#[$meta:meta])* $name:ident => $cpp:literal { $($(#[$fmeta:meta])* $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
        }

        impl KernelParams for $name {
            const CPP_NAME: &'static str = $cpp;
            fn fields() -> Vec<ParamField> {
                vec![$(ParamField {
                    name: stringify!($field),
                    cpp: <$ty as CppType>::cpp,
                    offset: std::mem::offset_of!($name, $field),
                    size: std::mem::size_of::<$ty>(),
                    align: std::mem::align_of::<$ty>(),
                }),*]
            }
        }

        // SAFETY: a `#[repr(C)]` struct of integers, floats and device addresses, whose C++
        // twin is checked field by field against this layout when the program compiles.
        #[cfg(feature = "cuda")]
        unsafe impl cudarc::driver::DeviceRepr for $name {}
    };
}

kernel_params! {
    /// `_append`: new K/V rows and the variant's derived structures, one block per page job
    /// (`[page, first_offset, count, src_row]`).
    AppendParams => "tw_append_params" {
        k_new: ConstPtr<Elem>,
        v_new: ConstPtr<Elem>,
        jobs: ConstPtr<i32>,
        k_cache: MutPtr<Elem>,
        v_cache: MutPtr<Elem>,
        page_bounds: MutPtr<Elem>,
        k_q4: MutPtr<u8>,
        k_q4_scale_min: MutPtr<half::f16>,
        k_label: MutPtr<Elem>,
        ds_channels: ConstPtr<i32>,
        num_jobs: i32,
        num_kv_heads: i32,
    }
}

kernel_params! {
    /// `_quest_score`: an upper bound of q.k for every page of every row.
    QuestScoreParams => "tw_quest_score_params" {
        q: ConstPtr<Elem>,
        page_bounds: ConstPtr<Elem>,
        kv_indptr: ConstPtr<i32>,
        kv_indices: ConstPtr<i32>,
        scores: MutPtr<f32>,
        num_kv_heads: i32,
        max_pages: i32,
    }
}

kernel_params! {
    /// `_quest_select`: the best `budget_pages` page positions of each row, the last included.
    QuestSelectParams => "tw_quest_select_params" {
        scores: ConstPtr<f32>,
        kv_indptr: ConstPtr<i32>,
        kv_indices: ConstPtr<i32>,
        selected: MutPtr<i32>,
        selected_count: MutPtr<i32>,
        /// The selected pages' ids in the pool, rows as `selected`.
        selected_pages: MutPtr<i32>,
        num_kv_heads: i32,
        max_pages: i32,
        budget_pages: i32,
    }
}

kernel_params! {
    /// `_ds_score`: q.k over the calibrated channels for every token of every row.
    DsScoreParams => "tw_ds_score_params" {
        q: ConstPtr<Elem>,
        k_label: ConstPtr<Elem>,
        ds_channels: ConstPtr<i32>,
        kv_indptr: ConstPtr<i32>,
        kv_indices: ConstPtr<i32>,
        kv_last_page_len: ConstPtr<i32>,
        scores: MutPtr<f32>,
        num_kv_heads: i32,
        max_tokens: i32,
        budget: i32,
    }
}

kernel_params! {
    /// `_ds_select`: the best `budget` token positions of each row, the newest included.
    DsSelectParams => "tw_ds_select_params" {
        scores: ConstPtr<f32>,
        kv_indptr: ConstPtr<i32>,
        kv_last_page_len: ConstPtr<i32>,
        selected: MutPtr<i32>,
        selected_count: MutPtr<i32>,
        num_kv_heads: i32,
        max_tokens: i32,
        budget: i32,
        stride: i32,
    }
}

kernel_params! {
    /// `_estimate`: logits of every candidate from the 4-bit K, per query head.
    EstimateParams => "tw_estimate_params" {
        q: ConstPtr<Elem>,
        k_q4: ConstPtr<u8>,
        k_q4_scale_min: ConstPtr<half::f16>,
        kv_indptr: ConstPtr<i32>,
        kv_indices: ConstPtr<i32>,
        kv_last_page_len: ConstPtr<i32>,
        /// The selector's positions (null for `full`).
        selected: ConstPtr<i32>,
        selected_count: ConstPtr<i32>,
        /// Quest's selected page ids (null for other selectors).
        selected_pages: ConstPtr<i32>,
        logits: MutPtr<f32>,
        num_kv_heads: i32,
        selected_stride: i32,
        max_cands: i32,
        sm_scale: f32,
    }
}

kernel_params! {
    /// `_threshold`: the exact top-p threshold weight of each query head.
    ThresholdParams => "tw_threshold_params" {
        logits: ConstPtr<f32>,
        kv_indptr: ConstPtr<i32>,
        kv_indices: ConstPtr<i32>,
        kv_last_page_len: ConstPtr<i32>,
        selected: ConstPtr<i32>,
        selected_count: ConstPtr<i32>,
        /// Quest's selected page ids (null for other selectors).
        selected_pages: ConstPtr<i32>,
        stats: MutPtr<f32>,
        num_kv_heads: i32,
        selected_stride: i32,
        max_cands: i32,
        p: f32,
    }
}

kernel_params! {
    /// `_threshold_compact`: threshold and compaction of a row in one cluster launch.
    ThresholdCompactParams => "tw_threshold_compact_params" {
        logits: ConstPtr<f32>,
        kv_indptr: ConstPtr<i32>,
        kv_indices: ConstPtr<i32>,
        kv_last_page_len: ConstPtr<i32>,
        selected: ConstPtr<i32>,
        selected_count: ConstPtr<i32>,
        /// Quest's selected page ids (null for other selectors).
        selected_pages: ConstPtr<i32>,
        stats: MutPtr<f32>,
        kept: MutPtr<i32>,
        kept_count: MutPtr<i32>,
        num_kv_heads: i32,
        selected_stride: i32,
        max_cands: i32,
        p: f32,
    }
}

kernel_params! {
    /// `_compact`: the kept candidates of each row as a list of token slots (every candidate
    /// without pruning, when `logits` and `stats` are null).
    CompactParams => "tw_compact_params" {
        logits: ConstPtr<f32>,
        stats: ConstPtr<f32>,
        kv_indptr: ConstPtr<i32>,
        kv_indices: ConstPtr<i32>,
        kv_last_page_len: ConstPtr<i32>,
        selected: ConstPtr<i32>,
        selected_count: ConstPtr<i32>,
        /// Quest's selected page ids (null for other selectors).
        selected_pages: ConstPtr<i32>,
        kept: MutPtr<i32>,
        kept_count: MutPtr<i32>,
        num_kv_heads: i32,
        selected_stride: i32,
        max_cands: i32,
    }
}

kernel_params! {
    /// `_attend`: exact attention over every token of a request (dense variants read the page
    /// table) or over a row's kept list (sparse variants read `kept`), split over
    /// `num_chunks` blocks per row and merged by the last one.
    AttendParams => "tw_attend_params" {
        q: ConstPtr<Elem>,
        k_cache: ConstPtr<Elem>,
        v_cache: ConstPtr<Elem>,
        kv_indptr: ConstPtr<i32>,
        kv_indices: ConstPtr<i32>,
        kv_last_page_len: ConstPtr<i32>,
        kept: ConstPtr<i32>,
        kept_count: ConstPtr<i32>,
        o: MutPtr<Elem>,
        lse: MutPtr<f32>,
        partial_o: MutPtr<f32>,
        partial_lse: MutPtr<f32>,
        done: MutPtr<i32>,
        num_kv_heads: i32,
        max_kept: i32,
        min_chunk_tokens: i32,
        num_chunks: i32,
        /// Nonzero: blocks numbered chunk-major (attend.cuh, `tw_attend_block`).
        chunk_major: i32,
        sm_scale: f32,
    }
}

impl Stage {
    /// The C++ definition of the stage's parameter struct, for a program of dtype `elem`.
    pub fn params_cpp(self, elem: &str) -> String {
        match self {
            Stage::Append => AppendParams::cpp_definition(elem),
            Stage::QuestScore => QuestScoreParams::cpp_definition(elem),
            Stage::QuestSelect | Stage::QuestSelectInRegisters => {
                QuestSelectParams::cpp_definition(elem)
            }
            Stage::DsScore => DsScoreParams::cpp_definition(elem),
            Stage::DsSelect | Stage::DsSelectInRegisters => DsSelectParams::cpp_definition(elem),
            Stage::Estimate => EstimateParams::cpp_definition(elem),
            Stage::Threshold | Stage::ThresholdInSmallBlocks => {
                ThresholdParams::cpp_definition(elem)
            }
            Stage::ThresholdCompact => ThresholdCompactParams::cpp_definition(elem),
            Stage::Compact | Stage::CompactInSmallBlocks => CompactParams::cpp_definition(elem),
            Stage::Attend | Stage::AttendMma => AttendParams::cpp_definition(elem),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpp_twin_spells_every_field_with_its_rust_offset() {
        let text = QuestScoreParams::cpp_definition("__half");
        assert!(text.starts_with("struct tw_quest_score_params {\n  const __half* q; "));
        assert!(text.contains("  int max_pages;"), "{text}");
        assert!(text.contains("// offset 44\n};"), "{text}");
        assert!(
            text.contains("sizeof(tw_quest_score_params) == 48"),
            "{text}"
        );
        assert!(text.contains(
            "sizeof(tw_quest_score_params::max_pages) == 4 && alignof(decltype(tw_quest_score_params::max_pages)) == 4"
        ));
        let scales = EstimateParams::cpp_definition("__nv_bfloat16");
        assert!(scales.contains("const half* k_q4_scale_min;"), "{scales}");
        assert!(scales.contains("const __nv_bfloat16* q;"), "{scales}");
    }

    #[test]
    fn pointers_are_device_addresses() {
        assert_eq!(std::mem::size_of::<ConstPtr<Elem>>(), 8);
        assert_eq!(std::mem::size_of::<MutPtr<half::f16>>(), 8);
        assert!(AttendParams::default().o.is_null());
    }
}
