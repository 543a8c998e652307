//! The one reader of `/etc/passwd` and `/etc/group` texts (an image's, for
//! USER, `--chown` and RUN's groups; the host's, for the rootless user's
//! name): colon-separated lines, looked up by name or by id. Malformed
//! lines are skipped, as libc skips them.

/// One `/etc/passwd` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User<'a> {
    pub name: &'a str,
    pub uid: u64,
    /// The primary group, where the field is numeric.
    pub gid: Option<u64>,
    pub home: Option<&'a str>,
}

/// One `/etc/group` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group<'a> {
    pub name: &'a str,
    pub gid: u64,
    /// The user names listed as members (empty names left out).
    pub members: Vec<&'a str>,
}

fn users(text: &str) -> impl Iterator<Item = User<'_>> {
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        Some(User {
            name: f.first()?,
            uid: f.get(2)?.parse().ok()?,
            gid: f.get(3).and_then(|g| g.parse().ok()),
            home: f.get(5).copied(),
        })
    })
}

fn groups(text: &str) -> impl Iterator<Item = Group<'_>> {
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        Some(Group {
            name: f.first()?,
            gid: f.get(2)?.parse().ok()?,
            members: f
                .get(3)
                .map(|m| {
                    m.split(',')
                        .map(str::trim)
                        .filter(|m| !m.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
        })
    })
}

/// The first user named `name`.
pub fn user_by_name<'a>(text: &'a str, name: &str) -> Option<User<'a>> {
    users(text).find(|u| u.name == name)
}

/// The first user with the id `uid`.
pub fn user_by_uid(text: &str, uid: u64) -> Option<User<'_>> {
    users(text).find(|u| u.uid == uid)
}

/// The id of the first group named `name`.
pub fn group_by_name(text: &str, name: &str) -> Option<u64> {
    groups(text).find(|g| g.name == name).map(|g| g.gid)
}

/// The groups that list `user` as a member (none for an empty name).
pub fn memberships(text: &str, user: &str) -> Vec<u64> {
    if user.is_empty() {
        return Vec::new();
    }
    groups(text)
        .filter(|g| g.members.contains(&user))
        .map(|g| g.gid)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nbroken\nworker:x:1000:1000::/home/worker:/bin/sh\nodd:x:5:notanumber::/:\n";
    const GROUP: &str = "root:x:0:\nshadow:x:42:\nstaff:x:50:root, worker\nusers:x:100:worker\n";

    #[test]
    fn users_and_groups_are_found_by_name_and_id() {
        assert_eq!(user_by_name(PASSWD, "worker").unwrap().uid, 1000);
        assert_eq!(user_by_uid(PASSWD, 0).unwrap().name, "root");
        assert_eq!(user_by_uid(PASSWD, 0).unwrap().home, Some("/root"));
        assert_eq!(user_by_name(PASSWD, "odd").unwrap().gid, None);
        assert!(user_by_name(PASSWD, "broken").is_none());
        assert_eq!(group_by_name(GROUP, "shadow"), Some(42));
        assert_eq!(memberships(GROUP, "worker"), [50, 100]);
        assert_eq!(memberships(GROUP, "root"), [50]);
        // An empty name is in no group, whatever lists are empty.
        assert_eq!(memberships(GROUP, ""), Vec::<u64>::new());
    }
}
