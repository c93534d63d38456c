"""The Mosquitto broker as Edgeward runs it: the ACL derived from the topic scheme
(:mod:`.acl`), the reviewed configuration template (:mod:`.config`), the dynamic-security
plugin's state and control commands (:mod:`.dynsec`) and a launcher for the real binary
(:mod:`.launcher`). The topic scheme itself belongs to :mod:`edgeward_shared.topics`, the
certificates to :mod:`edgeward_shared.pki`."""
