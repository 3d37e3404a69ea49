"""The ``qemu`` platform: a measured-boot VM (OVMF, swtpm) from an image built here.

Running VMs: ``provider`` (the VM's life), ``vm`` (qemu processes, firmware), ``kvm`` (the
accelerator's choice), ``monitor`` (qemu's monitor). The guest image: ``image`` (finding and
loading one), ``recipe`` (what it is made of), ``debian``, ``wheels``, ``initramfs`` and
``build`` (making one), ``observe`` (recording its measured boot), ``command`` (``aicert
image build-guest``); ``guest/`` holds the guest's scripts.
"""

from aicert.tasks.platforms.qemu.provider import QemuProvider

__all__ = ["QemuProvider"]
