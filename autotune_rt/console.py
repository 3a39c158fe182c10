"""Human console lines in the seed's wording: English by default, the seed's Chinese with ``zh``."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

__all__ = ["MESSAGES", "Console", "detect_lang", "format_weights", "silence"]

# The seed's own lines (seed-usage.zh.md) are the Chinese entries of trial_start, command,
# stagnation, new_config and finished, word for word.
MESSAGES: dict[str, dict[str, str]] = {
    "trial_start": {"en": "Starting trial {trial}/{trials}", "zh": "开始第 {trial}/{trials} 次训练"},
    "command": {"en": "Training command: {command}", "zh": "训练命令: {command}"},
    "stagnation": {
        "en": "Stagnation detected, adjusting loss weights...",
        "zh": "检测到性能停滞，调整损失权重...",
    },
    "diagnosis": {
        "en": "Diagnosis at epoch {epoch}: {problem} ({evidence})",
        "zh": "第 {epoch} 轮诊断: {problem} ({evidence})",
    },
    "new_config": {"en": "New config: {weights}", "zh": "新配置: {weights}"},
    "finished": {
        "en": "Training finished, final best_metric: {best}",
        "zh": "训练完成，最终best_metric: {best}",
    },
    "run_dir": {"en": "Run directory: {run_dir}", "zh": "运行目录: {run_dir}"},
    "config_file": {
        "en": "Control file: {path} (version {version})",
        "zh": "配置文件: {path} (版本 {version})",
    },
    "config_applied": {
        "en": "Training applied config version {version} at epoch {epoch} ({latency:.2f}s after writing)",
        "zh": "训练已在第 {epoch} 轮应用配置版本 {version} (写入后 {latency:.2f} 秒)",
    },
    "not_acknowledged": {
        "en": "The training does not seem to read the control file {path}: version {version} was not "
        "applied after {epochs} epochs. Add to train.py: `from autotune_rt.client import "
        "ConfigReloader` and call `ConfigReloader().apply(args)` once per epoch.",
        "zh": "训练进程似乎没有读取配置文件 {path}: 版本 {version} 在 {epochs} 轮后仍未应用。"
        "请在 train.py 中加入 `from autotune_rt.client import ConfigReloader`，"
        "并在每个 epoch 调用 `ConfigReloader().apply(args)`。",
    },
    "manual_override": {
        "en": "Control file edited by hand; adopting it: {weights}",
        "zh": "配置文件被手动修改，采用新值: {weights}",
    },
    "config_restored": {
        "en": "Control file {path} was deleted; restored version {version}",
        "zh": "配置文件 {path} 被删除，已恢复版本 {version}",
    },
    "write_failed": {
        "en": "Could not write the control file: {error}; the training keeps its current weights",
        "zh": "无法写入配置文件: {error}；训练继续使用当前权重",
    },
    "child_exited": {"en": "Training {description}", "zh": "训练进程{description}"},
    "signal": {
        "en": "Received {signal}; stopping the training "
        "(grace period {grace:.0f}s, Ctrl-C again to kill now)",
        "zh": "收到 {signal}，正在停止训练 (等待 {grace:.0f} 秒，再按 Ctrl-C 立即终止)",
    },
    "stalled": {
        "en": "The training printed nothing for {seconds:.0f}s",
        "zh": "训练进程已 {seconds:.0f} 秒没有输出",
    },
    "trial_failed": {
        "en": "Trial {trial} failed: {description}",
        "zh": "第 {trial} 次训练失败: {description}",
    },
    "best_config": {
        "en": "Best configuration (trial {trial}, best_metric {best}): {weights}",
        "zh": "最佳配置 (第 {trial} 次训练, best_metric {best}): {weights}",
    },
    "rerun": {"en": "Rerun it with: {command}", "zh": "使用以下命令重新训练: {command}"},
    "space_exhausted": {
        "en": "Every configuration near the best one was already tried; stopping the batch",
        "zh": "最佳配置附近的所有组合都已尝试，停止批量调参",
    },
    "stop_trial": {
        "en": "Stopping trial {trial} early (--stop_on_stagnation)",
        "zh": "提前结束第 {trial} 次训练 (--stop_on_stagnation)",
    },
    "metric_missing": {
        "en": "The training does not print the metric {metric!r}; it prints: {available}. "
        "Pass --metric <one of them>",
        "zh": "训练输出中没有指标 {metric!r}；可用指标: {available}。请使用 --metric 指定其中之一",
    },
    "progress": {
        "en": "{label}epoch {done}/{total}, about {left} left",
        "zh": "{label}第 {done}/{total} 轮，预计还需 {left}",
    },
    "summary": {"en": "Summary: {path}", "zh": "总结: {path}"},
    "verdict": {
        "en": "Config version {version} judged {outcome}: best {best} in epochs {window} "
        "(before the change: {previous})",
        "zh": "配置版本 {version} 评估结果: {outcome}，第 {window} 轮最佳 {best} (调整前: {previous})",
    },
    "rollback": {
        "en": "Config version {version} made things worse; rolling back to the best-known weights: {weights}",
        "zh": "配置版本 {version} 使结果变差，回滚到已知最佳权重: {weights}",
    },
}


def detect_lang(requested: str = "auto", environ: Mapping[str, str] | None = None) -> str:
    """Return ``"en"`` or ``"zh"``: *requested* unless ``auto``, then the locale's language."""
    if requested in ("en", "zh"):
        return requested
    env = os.environ if environ is None else environ
    for key in ("LC_ALL", "LC_MESSAGES", "LANG"):
        value = env.get(key)
        if value:
            return "zh" if value.lower().startswith("zh") else "en"
    return "en"


def format_weights(weights: Mapping[str, float]) -> str:
    """``lambda_dol=0.6, lambda_col=0.4, ...``: the seed's ``新配置`` format."""
    return ", ".join(f"{name}={value:g}" for name, value in weights.items())


class Console:
    """Writes the user's console lines (stderr by default) in one language."""

    def __init__(self, lang: str = "en", stream: TextIO | None = None) -> None:
        self.lang = lang
        self._stream = stream

    def say(self, key: str, **fields: Any) -> None:
        """Print message *key* formatted with *fields*; a closed stream is ignored."""
        self.write(MESSAGES[key][self.lang].format(**fields))

    def write(self, text: str) -> None:
        """Print *text* and a newline; a closed stream is silenced, never raised."""
        stream = self._stream if self._stream is not None else sys.stderr
        try:
            stream.write(text + "\n")
            stream.flush()
        except (OSError, ValueError):  # a closed terminal must never stop the supervisor
            silence(stream)


def silence(stream: TextIO) -> None:
    """Point a broken stream's file descriptor at /dev/null.

    The text already buffered in the stream would otherwise fail again when Python flushes
    it at exit, and turn the training's exit code into 120 (the recipe of the Python docs
    for SIGPIPE).
    """
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)
