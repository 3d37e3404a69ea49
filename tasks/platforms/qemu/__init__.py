"""The ``qemu`` platform: a measured-boot VM (OVMF, swtpm) from an image built here.

``provider`` runs the VM; ``image`` builds the guest image (kernel, initramfs) and records
the reference values its boot must replay to.
"""

from aicert.tasks.platforms.qemu.provider import QemuProvider

__all__ = ["QemuProvider"]
