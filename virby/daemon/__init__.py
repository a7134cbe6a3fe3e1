"""
The daemon: everything that runs on the reactor.  The service (L{virby.daemon.service}) adopts
the builder's socket, splices each connection into the VM (L{virby.daemon.proxy},
L{virby.daemon.relay}), boots and stops the VM as its lifecycle decides
(L{virby.daemon.lifecycle}, L{virby.daemon.hypervisor}, L{virby.daemon.vfkit}), and answers
the control socket (L{virby.daemon.control}).  Nothing here blocks; nothing in the flat core
or in L{virby.cli} imports from here.
"""
