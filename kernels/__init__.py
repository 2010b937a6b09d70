"""nanofast.kernels: drop-in kernels, each beside its plain-torch reference.

This package imports nothing from the rest of nanofast, so other projects can take it alone.
Every kernel takes `backend=` ("torch", "triton", "cuda"; None picks by device: Triton on CUDA
tensors, the torch reference on CPU) and runs on CPU tensors too: Triton through its interpreter
(TRITON_INTERPRET=1 set before triton is imported), CUDA through the CPU emulation build.
Each op is declared once, at the end of its module (`OP`), and `registry.OPS` collects them: the
validation of its public entries, its reference, vendor path, launchers per backend, byte/FLOP
model and compile-gate configurations.
"""
if __name__ == "kernels":
    # This folder is nanofast.kernels. With a nanofast checkout's root on sys.path (python run from
    # there), `import kernels` would find it before Hugging Face's `kernels` distribution, which
    # transformers imports: hand that import over to the installed package instead of breaking it.
    from ._shadowed import hand_over

    hand_over(__file__)
else:
    from .backend import BACKENDS, resolve_backend, triton_interpreting

    if triton_interpreting():  # bf16 dots would multiply raw bit patterns (see kernels/interpreter.py)
        from .interpreter import patch_bf16_dot, patch_scalar_index

        patch_bf16_dot()
        patch_scalar_index()  # triton 3.6's interpreter: range(pid, ...) under NumPy >= 2.4
    from .fp8_gemm import fp8_gemm, fp8_gemm_reference
    from .fp8_linear import FP8_BACKENDS, FP8Linear, fp8_linear
    from .fp8_quant import DelayedScaling, quantize_fp8, quantize_fp8_reference
    from .linear_cross_entropy import (LinearCrossEntropyLoss, LinearSoftcapCrossEntropy, linear_cross_entropy,
                                       linear_cross_entropy_reference, linear_softcap_cross_entropy,
                                       linear_softcap_cross_entropy_reference)
    from .newton_schulz import (CLASSIC_NS_COEFFS, POLAR_EXPRESS_COEFFS, nesterov_normalize_, newton_schulz,
                                newton_schulz_reference, zeropower_via_newtonschulz5)
    from .paged_attention import (gather_pages, paged_decode_attention, paged_decode_attention_reference,
                                  paged_kv_write, paged_kv_write_reference, plan_paged_decode)
    from .qk_norm_rope import QKNormRope, qk_norm_rope, qk_norm_rope_inplace, qk_norm_rope_reference, rotary_tables
    from .rms_norm import RMSNorm, rms_norm, rms_norm_reference
    from .rotary import (apply_rotary_pos_emb, apply_rotary_pos_emb_reference, rotary_embedding,
                         rotary_embedding_reference)

    __all__ = ["BACKENDS", "FP8_BACKENDS", "resolve_backend", "fp8_gemm", "fp8_gemm_reference", "fp8_linear",
               "quantize_fp8", "quantize_fp8_reference", "DelayedScaling", "newton_schulz", "newton_schulz_reference",
               "POLAR_EXPRESS_COEFFS", "CLASSIC_NS_COEFFS", "nesterov_normalize_", "paged_decode_attention",
               "paged_decode_attention_reference", "plan_paged_decode", "paged_kv_write", "paged_kv_write_reference",
               "gather_pages", "rms_norm", "rms_norm_reference", "RMSNorm", "qk_norm_rope", "qk_norm_rope_inplace",
               "qk_norm_rope_reference", "QKNormRope", "rotary_tables", "linear_softcap_cross_entropy",
               "linear_softcap_cross_entropy_reference", "LinearSoftcapCrossEntropy", "apply_rotary_pos_emb",
               "apply_rotary_pos_emb_reference", "rotary_embedding", "rotary_embedding_reference", "FP8Linear",
               "zeropower_via_newtonschulz5", "linear_cross_entropy", "linear_cross_entropy_reference",
               "LinearCrossEntropyLoss"]
