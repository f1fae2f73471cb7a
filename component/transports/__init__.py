"""Alias transports to other IM networks (DESIGN 3.3, 9): probing, early refusal, status chatter,
and the gateway domain's own presence reflecting the SIP side's health.

``board`` keeps each transport's state (sans-IO), ``health`` the SIP side's, ``chatter`` folds a
transport's status messages into one notice; ``service`` drives them with the clock and ports.
"""
