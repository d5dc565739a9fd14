"""The Lua scripts of cluster sessions (each touches one session's keys only).

Every persistent or online session has seven keys under the hashtag
``{c:<client id>}`` (one Redis Cluster slot, so one script changes a session
atomically):

=========  ======  =================================================================
key        type    holds
=========  ======  =================================================================
``s``      HASH    ``node`` (owner), ``epoch`` (fencing token, +1 per claim),
                   ``online`` 0/1, ``persistent`` 0/1, ``owner`` (username),
                   ``rec`` (the pickled ``SessionRecord`` as last written whole:
                   expiry, and the subscriptions unless ``bonly``),
                   ``st`` (a pickled ``PutSessionState``: the record's fields
                   but the subscriptions, written on (re)connect and close;
                   applied over ``rec``), ``bonly`` 1 (``rec`` holds no
                   subscriptions: they are all in ``b``),
                   ``exp`` (the Session Expiry Interval in ms; absent: never),
                   ``exp_at`` (Redis ``TIME`` in ms when the offline session
                   expires; absent while online or never expiring),
                   ``hnode``/``hepoch`` (the previous owner during a hand-off),
                   ``ib:<node>`` (the last entry of ``node``'s inbox whose
                   QoS 2 message the session took: ``<entry id>-<index>``)
``o``      HASH    seq -> pickled ``OutboundRecord`` (queued or in flight)
``t``      HASH    seq -> ``<packet id>:<stage>`` (in-flight stage updates)
``i``      SET     inbound QoS 2 packet ids waiting for PUBREL, each
                   ``<packet id>/<instance>`` (the instance id under which
                   the message was handed to other nodes, see
                   :mod:`mqttd.cluster.bus`; a bare id from an older node)
``w``      HASH    the will: ``kind`` = ``conn`` (the live connection's will,
                   ``m`` pickled Message, ``delay``) or ``pending`` (a delayed
                   will, ``m`` pickled ``WillRecord``)
``f``      LIST    pickled ``OutboundRecord``\\ s forwarded by a node that no
                   longer owns the session (moved into ``o`` by the owner)
``b``      HASH    filter -> pickled ``SubscriptionRecord``, one per subscription
                   (a SUBSCRIBE writes one field per filter, an UNSUBSCRIBE deletes
                   it: what a change costs does not grow with the session's other
                   subscriptions, REVIEW-S9 R15); ``''`` marks a filter removed
                   from a ``rec`` written before ``b`` existed (no ``bonly``)
=========  ======  =================================================================

A session is read as ``rec``, then ``st`` applied, then each ``b`` field (a
subscription put, or ``''`` removed) -- by
:func:`mqttd.persistence.records.apply_op`, as a store's journal; the order of
the subscriptions in ``b`` is Redis's (it does not change what is delivered).
A session written before ``b`` and ``st`` existed (``rec`` alone) reads as
before.

Writes carry ``(node, epoch)``; a write whose epoch is not the session's
answers ``F`` (fenced) and changes nothing -- except that queued messages in
it are appended to ``f``, so a message routed to the old owner during a
takeover is not lost.

**The hand-off is exact.**  A claim that resumes a session opens a hand-off
window: until the new owner loads the session (``session_load`` closes it),
the writes of the previous owner at its last epoch still change the
session's *content* -- queued and in-flight messages, their stages, the
inbound QoS 2 packet ids, the subscriptions -- but never its ownership,
online state or will.  The new owner loads only after the old one answered
the kick (having written everything it did), so it sees every PUBREC the old
one sent and every message it accepted [MQTT-4.3.3-10].

**Expiry is judged on Redis's clock.**  A disconnect (``X``) stores
``exp_at`` = Redis ``TIME`` + ``exp``; a claim or a reaper finding an offline
session past ``exp_at`` treats it as gone, whether or not its owner (maybe
dead and not yet reaped) ran its expiry timer.
"""
from __future__ import annotations

from typing import List

#: the suffixes of one session's keys, in the order every script takes them
SESSION_KEYS = ("s", "o", "t", "i", "w", "f", "b")


def session_keys(prefix: str, client_id: str) -> List[str]:
    """The seven keys of ``client_id``'s session (see the module docstring)."""
    base = f"{prefix}{{c:{client_id}}}:"
    return [base + suffix for suffix in SESSION_KEYS]


def node_sessions_key(prefix: str, node: str) -> str:
    """The SET of client ids whose session ``node`` owns (the reaper's list)."""
    return f"{prefix}{{n:{node}}}:sessions"


#: Redis's clock in ms (``TIME``), for expiry deadlines
NOW_MS = r"""
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# claim: KEYS s o t i w f b
# ARGV node clean_start persistent username has_username allow_other_user will delay boot
# -> {'OWNER', owner} (the session is online and another user's) |
#    {'OK', old_node, old_epoch, epoch, present, old_online, expired, replaced, will...}
# An offline session of another user is discarded as by a Clean Start
# (``replaced`` 1): never resumed by another user, never a lock-out.
CLAIM = NOW_MS + r"""
local s = redis.call('HMGET', KEYS[1], 'node', 'epoch', 'online', 'persistent', 'owner',
                     'exp_at')
local old_epoch = tonumber(s[2]) or 0
local exists = s[2] ~= false
-- an offline session past its deadline is gone, reaped or not
local expired = exists and s[3] ~= '1' and s[6] ~= false and tonumber(s[6]) <= now_ms()
local present = exists and not expired and (s[4] == '1' or s[3] == '1')
local owner = s[5]
local foreign = present and owner and owner ~= '' and ARGV[6] ~= '1'
   and (ARGV[5] ~= '1' or owner ~= ARGV[4])
if foreign and s[3] == '1' then
  return {'OWNER', owner}
end
local will = redis.call('HGETALL', KEYS[5])
redis.call('DEL', KEYS[5])
if ARGV[2] == '1' or not present or foreign then
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[6], KEYS[7])
  redis.call('HDEL', KEYS[1], 'rec', 'exp', 'st', 'bonly')
  present = false
end
local epoch = old_epoch + 1
local user = ''
if ARGV[5] == '1' then user = ARGV[4] end
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'epoch', epoch, 'online', 1,
           'persistent', ARGV[3], 'owner', user, 'boot', ARGV[9])
redis.call('HDEL', KEYS[1], 'exp_at')
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  local kind = string.sub(field, 1, 3)
  if kind == 'ho:' or (kind == 'ib:' and not present) then redis.call('HDEL', KEYS[1], field) end
end
if present and s[1] then
  -- the hand-off window: the previous owner's writes still reach the content
  redis.call('HSET', KEYS[1], 'hnode', s[1], 'hepoch', old_epoch)
else
  redis.call('HDEL', KEYS[1], 'hnode', 'hepoch')
end
if ARGV[7] ~= '' then
  redis.call('HSET', KEYS[5], 'kind', 'conn', 'm', ARGV[7], 'delay', ARGV[8])
end
local reply = {'OK', s[1] or '', old_epoch, epoch, present and 1 or 0, s[3] or '0',
               expired and 1 or 0, foreign and 1 or 0}
for _, v in ipairs(will) do reply[#reply + 1] = v end
return reply
"""

# load: KEYS s o t i w f b   ARGV node epoch
# Closes the hand-off window (the previous owner's writes are fenced from
# now on), then returns {'OK', rec, persistent, {o...}, {t...}, {i...},
# {records}, {b...}, st} or {'F', node, epoch} when fenced; records: the queued
# messages the previous owner wrote during the hand-off (``ho:<seq>`` in s,
# kept even if acknowledged since).  Forwarded messages (f) stay: the owner
# pulls them (session_pull) and queues them under its queue limits.
LOAD = r"""
local s = redis.call('HMGET', KEYS[1], 'node', 'epoch', 'rec', 'persistent', 'st')
if s[1] ~= ARGV[1] or s[2] ~= ARGV[2] then
  return {'F', s[1] or '', s[2] or '0'}
end
redis.call('HDEL', KEYS[1], 'hnode', 'hepoch')
-- the queued messages the previous owner wrote during the hand-off
local handed = {}
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(field, 1, 3) == 'ho:' then
    handed[#handed + 1] = redis.call('HGET', KEYS[1], field)
    redis.call('HDEL', KEYS[1], field)
  end
end
return {'OK', s[3] or '', s[4] or '0', redis.call('HGETALL', KEYS[2]),
        redis.call('HGETALL', KEYS[3]), redis.call('SMEMBERS', KEYS[4]), handed,
        redis.call('HGETALL', KEYS[7]), s[5] or ''}
"""

# pull: KEYS s o t i w f b   ARGV node epoch base_seq max
# The owner takes forwarded messages: each is stored in o under base_seq + k
# (the caller reserved that range) and returned as {seq, blob, seq, blob...}.
PULL = r"""
local s = redis.call('HMGET', KEYS[1], 'node', 'epoch')
if s[1] ~= ARGV[1] or s[2] ~= ARGV[2] then
  return {'F', s[1] or '', s[2] or '0'}
end
local fwd = redis.call('LRANGE', KEYS[6], 0, tonumber(ARGV[4]) - 1)
local reply = {'OK'}
local base = tonumber(ARGV[3])
for i, blob in ipairs(fwd) do
  redis.call('HSET', KEYS[2], base + i - 1, blob)
  reply[#reply + 1] = tostring(base + i - 1)
  reply[#reply + 1] = blob
end
if #fwd > 0 then redis.call('LTRIM', KEYS[6], #fwd, -1) end
return reply
"""

# apply: KEYS s o t i w f b   ARGV node epoch [Z wid] op args op args ...
# ops: S rec exp | D | O seq blob | U seq state | R seq | I pid | J pid | W blob |
#      V | X | Y | G blob | P node position | B filter blob | E filter | T st exp
#   (S: the whole record, ``b`` emptied -- the subscriptions follow as B ops
#   of the same batch, ``bonly`` set; B: put one subscription; E: remove one;
#   T: the record's fields but the subscriptions, a pickled PutSessionState)
#   (Z wid, first if present: the batch's write id ``<process>:<n>``, n
#   growing per writing process: a batch re-sent after an unknown outcome --
#   a timeout, or a Redis Cluster pipeline that failed on another master --
#   is recognized (``w:<node>`` of s holds the last applied one; an id of the
#   same process at or below it was applied) and not applied twice; without
#   it, its forwards (G, and O refused by the fence) were pushed to f twice)
#   (exp: the Session Expiry Interval in ms, '' = never; X: the connection
#   ended, its will is void; Y: the connection ended without its node
#   deciding on the will -- a fenced node -- the will is taken and returned;
#   G: forward a queued message to whoever owns the session; P: the session
#   took the inbox entry ``position`` of ``node`` -- ``ib:<node>`` of s, the
#   reaper's high-water mark, see mqttd.cluster.reaper)
# -> {'OK', gone, will...}  (gone = 1 when the session's keys were deleted;
#    will: the pairs a Y took) | {'F', node, epoch, forwarded}
# The previous owner's writes at its last epoch during a hand-off (hnode,
# hepoch set by a claim, cleared by the new owner's load) change the
# content only (S O U R I J G B E T); D W V X Y are the owner's business.
APPLY = NOW_MS + r"""
local s = redis.call('HMGET', KEYS[1], 'node', 'epoch', 'online', 'persistent', 'hnode',
                     'hepoch')
local arity = {S=2, D=0, O=2, U=2, R=1, I=1, J=1, W=1, V=0, X=0, Y=0, G=1, P=2, B=2, E=1, T=2}
local fenced = s[1] ~= ARGV[1] or s[2] ~= ARGV[2]
local handoff = false
if fenced then
  handoff = s[5] ~= false and s[5] == ARGV[1] and s[6] == ARGV[2]
end
local first = 3
local wid = false
local wfield = 'w:' .. ARGV[1]
if ARGV[3] == 'Z' then
  -- write ids are <process>:<n>, n growing: one of this process at or
  -- below the last applied one was applied already (a re-send after an
  -- unknown outcome changes nothing)
  wid = ARGV[4]
  first = 5
  local last = s[2] and redis.call('HGET', KEYS[1], wfield)
  if last then
    local lp, ln = string.match(last, '^(.*):(%d+)$')
    local wp, wn = string.match(wid, '^(.*):(%d+)$')
    if lp and lp == wp and tonumber(wn) <= tonumber(ln) then
      if fenced and not handoff then return {'F', s[1] or '', s[2] or '0', 0} end
      return {'OK', 0}
    end
  end
end
if fenced and not handoff then
  local forwarded = 0
  if s[2] then
    local i = first
    while i <= #ARGV do
      local op = ARGV[i]
      if op == 'O' then
        redis.call('RPUSH', KEYS[6], ARGV[i + 2]); forwarded = forwarded + 1
      elseif op == 'G' then
        redis.call('RPUSH', KEYS[6], ARGV[i + 1]); forwarded = forwarded + 1
      elseif op == 'P' then
        -- the queued message goes on (f): its inbox position counts as taken
        redis.call('HSET', KEYS[1], 'ib:' .. ARGV[i + 1], ARGV[i + 2])
      end
      i = i + 1 + arity[op]
    end
    if wid and forwarded > 0 then redis.call('HSET', KEYS[1], wfield, wid) end
  end
  return {'F', s[1] or '', s[2] or '0', forwarded}
end
local online = s[3]
local persistent = s[4]
local gone = 0
local taken = {}
local i = first
while i <= #ARGV do
  local op = ARGV[i]
  if arity[op] == nil then
    return redis.error_reply('unknown op ' .. tostring(op))
  end
  if handoff and (op == 'D' or op == 'W' or op == 'V' or op == 'X' or op == 'Y') then
    -- not the previous owner's to change any more
  elseif op == 'S' then
    redis.call('HSET', KEYS[1], 'rec', ARGV[i + 1], 'persistent', 1, 'bonly', 1)
    persistent = '1'
    redis.call('HDEL', KEYS[1], 'st')
    redis.call('DEL', KEYS[7])
    if ARGV[i + 2] == '' then redis.call('HDEL', KEYS[1], 'exp')
    else redis.call('HSET', KEYS[1], 'exp', ARGV[i + 2]) end
  elseif op == 'T' then
    redis.call('HSET', KEYS[1], 'st', ARGV[i + 1], 'persistent', 1); persistent = '1'
    if ARGV[i + 2] == '' then redis.call('HDEL', KEYS[1], 'exp')
    else redis.call('HSET', KEYS[1], 'exp', ARGV[i + 2]) end
  elseif op == 'B' then
    if persistent == '1' then redis.call('HSET', KEYS[7], ARGV[i + 1], ARGV[i + 2]) end
  elseif op == 'E' then
    if persistent == '1' then
      if redis.call('HGET', KEYS[1], 'bonly') == '1' then
        redis.call('HDEL', KEYS[7], ARGV[i + 1])
      else
        -- the filter may be in a rec written before b existed: a tombstone
        redis.call('HSET', KEYS[7], ARGV[i + 1], '')
      end
    end
  elseif op == 'D' then
    redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[6], KEYS[7])
    redis.call('HDEL', KEYS[1], 'rec', 'exp', 'exp_at', 'st', 'bonly')
    redis.call('HSET', KEYS[1], 'persistent', 0); persistent = '0'
    local kind = redis.call('HGET', KEYS[5], 'kind')
    if kind == 'pending' then redis.call('DEL', KEYS[5]) end
    if online ~= '1' then
      redis.call('DEL', KEYS[1], KEYS[5]); gone = 1
    end
  elseif op == 'O' then
    redis.call('HSET', KEYS[2], ARGV[i + 1], ARGV[i + 2]); redis.call('HDEL', KEYS[3], ARGV[i + 1])
    -- queued by the previous owner after the claim: the new owner's node may
    -- have kept the same message for the session (see session_load)
    -- (the record itself: it may be acknowledged and gone by the load)
    if handoff then redis.call('HSET', KEYS[1], 'ho:' .. ARGV[i + 1], ARGV[i + 2]) end
  elseif op == 'U' then
    if redis.call('HEXISTS', KEYS[2], ARGV[i + 1]) == 1 then
      redis.call('HSET', KEYS[3], ARGV[i + 1], ARGV[i + 2])
    end
  elseif op == 'R' then
    redis.call('HDEL', KEYS[2], ARGV[i + 1]); redis.call('HDEL', KEYS[3], ARGV[i + 1])
  elseif op == 'I' then
    redis.call('SADD', KEYS[4], ARGV[i + 1])
  elseif op == 'J' then
    redis.call('SREM', KEYS[4], ARGV[i + 1])
  elseif op == 'W' then
    redis.call('DEL', KEYS[5])
    redis.call('HSET', KEYS[5], 'kind', 'pending', 'm', ARGV[i + 1])
  elseif op == 'V' then
    if redis.call('HGET', KEYS[5], 'kind') == 'pending' then redis.call('DEL', KEYS[5]) end
  elseif op == 'X' or op == 'Y' then
    online = '0'
    redis.call('HSET', KEYS[1], 'online', 0)
    local exp = redis.call('HGET', KEYS[1], 'exp')
    if exp then
      redis.call('HSET', KEYS[1], 'exp_at', now_ms() + tonumber(exp))
    else
      redis.call('HDEL', KEYS[1], 'exp_at')
    end
    if redis.call('HGET', KEYS[5], 'kind') == 'conn' then
      if op == 'Y' then taken = redis.call('HGETALL', KEYS[5]) end
      redis.call('DEL', KEYS[5])
    end
    if persistent ~= '1' then
      redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7])
      gone = 1
    end
  elseif op == 'G' then
    redis.call('RPUSH', KEYS[6], ARGV[i + 1])
  elseif op == 'P' then
    redis.call('HSET', KEYS[1], 'ib:' .. ARGV[i + 1], ARGV[i + 2])
  end
  i = i + 1 + arity[op]
end
if wid and redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], wfield, wid)
end
local reply = {'OK', gone}
for _, v in ipairs(taken) do reply[#reply + 1] = v end
return reply
"""

# adopt: KEYS s o t i w f b   ARGV dead_node me live_boot me_boot
# The reaper takes a dead node's session (not one of the node's live
# incarnation ``live_boot``, when the node id came back):
# -> {'skip', node} (moved on) | {'ended', will...} (not persistent, or
#    expired on Redis's clock: deleted, its will returned once) |
#    {'adopted', epoch, online, will...}
ADOPT = NOW_MS + r"""
local s = redis.call('HMGET', KEYS[1], 'node', 'epoch', 'persistent', 'online', 'rec', 'boot',
                     'exp_at', 'exp')
if s[1] ~= ARGV[1] then return {'skip', s[1] or ''} end
if ARGV[3] ~= '' and s[6] == ARGV[3] then return {'skip', s[1]} end
local will = redis.call('HGETALL', KEYS[5])
local now = now_ms()
local expired = s[4] ~= '1' and s[7] ~= false and tonumber(s[7]) <= now
if s[3] ~= '1' or expired then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7])
  local reply = {'ended'}
  for _, v in ipairs(will) do reply[#reply + 1] = v end
  return reply
end
local epoch = (tonumber(s[2]) or 0) + 1
redis.call('HSET', KEYS[1], 'node', ARGV[2], 'epoch', epoch, 'online', 0, 'boot', ARGV[4])
redis.call('HDEL', KEYS[1], 'hnode', 'hepoch')
if s[4] == '1' and s[8] then
  -- its connection died with the node: the session's expiry starts now
  redis.call('HSET', KEYS[1], 'exp_at', now + tonumber(s[8]))
end
if redis.call('HGET', KEYS[5], 'kind') == 'conn' then redis.call('DEL', KEYS[5]) end
local reply = {'adopted', epoch, s[4] or '0'}
for _, v in ipairs(will) do reply[#reply + 1] = v end
return reply
"""

SCRIPTS = {
    "session_claim": CLAIM,
    "session_load": LOAD,
    "session_pull": PULL,
    "session_apply": APPLY,
    "session_adopt": ADOPT,
}
